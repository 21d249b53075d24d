"""Workflows that run an engine: they decode or score with a base (and its module) and write what they find.

* ``self_prompts``: user prompts sampled from a chat model's own idea of a user turn (``data prompts``).
* ``distill``: the base's own greedy answers to prompts, as token memmaps (``data distill``); read back with
  ``data.open_distilled`` / ``data.distilled_answers``.
* ``gate_data`` / ``fit_copy_gate`` / ``copy_gate_file``: score a base and its module on answers and text, fit
  the module's copy gate and save the module with it (``copy-gate``); the gate's math is ``copy_gate.py``.

Layers: this module sits above the math (``copy_gate``, ``sampling``) and the file formats (``data``) and
imports them; nothing below it imports it. The CLI calls it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from recyclegpt.copy_gate import fit_gate, gate, gate_features, mixed_top, module_side, window_proposals
from recyclegpt.data import DataError, PromptFilter, SplitWriter, prompt_ids, read_tokens
from recyclegpt.sampling import SamplingConfig


def self_prompts(
    engine, n: int, out_path: str | Path, batch_size: int = 32, max_new_tokens: int = 64,
    temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, min_words: int = 3,
    exclude: Sequence[str] = (),
) -> dict:
    """User prompts sampled from a chat model's own idea of a user turn, written as JSONL.

    The chat template is opened up to the user's message and the model writes that message itself
    (the idea of Magpie, Xu et al. 2024, arXiv 2406.08464): prompts of the kind the model was tuned to
    answer, with no dataset download. Turns that run past ``max_new_tokens``, have fewer than
    ``min_words`` words, or repeat an earlier one are dropped; sampling goes on until ``n`` are kept.

    Args:
        engine: a ``recyclegpt.generate.Engine`` on a chat model (its tokenizer must have a template).
        n: prompts to keep.
        out_path: the JSONL file to write (``{"prompt": ...}`` per line).
        batch_size: turns sampled together.
        max_new_tokens: longest turn.
        temperature / top_p: sampling settings (diversity).
        seed: sampling seed; batch i samples with seed ``seed * 1_000_000 + i``, so runs with different
            seeds never share a batch (with ``seed + i``, seed 1 repeated seed 0's batches shifted by one).
        min_words: shortest turn kept.
        exclude: prompts that must not be kept (compared as in :func:`exclude_prompts`); sampling goes on
            until ``n`` others are kept.

    Raises:
        DataError: the tokenizer has no chat template, or ``n`` < 1.
    """
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise DataError("self-prompting needs a chat model (a tokenizer with a chat template)")
    if n < 1:
        raise DataError(f"number of prompts must be >= 1, got {n}")
    marker = "\u2063RECYCLEGPT\u2063"  # any text the template copies verbatim
    opening = tok.apply_chat([{"role": "user", "content": marker}]).split(marker)[0]
    prefix = tok.encode(opening)
    banned = PromptFilter(exclude)
    kept: dict[str, None] = {}
    tried = excluded = 0
    with tqdm(total=n, desc="self-prompting", unit="prompt") as bar:
        while len(kept) < n:
            batch_seed = seed * 1_000_000 + tried // batch_size
            cfg = SamplingConfig(temperature=temperature, top_p=top_p, seed=batch_seed)
            for g in engine.generate([prefix] * batch_size, max_new_tokens=max_new_tokens, sampling=cfg):
                text = g.text.strip()
                if text in banned:
                    excluded += 1
                elif g.finish_reason == "stop" and len(text.split()) >= min_words and text not in kept:
                    kept[text] = None
            tried += batch_size
            bar.update(min(len(kept), n) - bar.n)
            bar.set_postfix(kept=f"{len(kept) / tried:.0%}")
    prompts = list(kept)[:n]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return {"prompts": len(prompts), "sampled": tried, "excluded": excluded, "temperature": temperature,
            "top_p": top_p, "seed": seed, "base_dtype": _dtype_name(engine)}


def distill(
    engine, prompts: Sequence[str], out_dir: str | Path, max_new_tokens: int = 128, batch_size: int = 16,
    val_fraction: float = 0.05, chat: bool = True, name: str = "",
) -> dict:
    """Self-distillation data: the base's own greedy answers to prompts, as token memmaps.

    Each sequence is (chat-templated) prompt + the base's greedy continuation + EOS, so a module trained
    on it learns to predict what the base itself says. Prompts are batched by length; every
    ``1/val_fraction``-th prompt goes to the validation split.

    Args:
        engine: a ``recyclegpt.generate.Engine`` on the base.
        prompts: user prompts (the chat template is applied when ``chat``).
        out_dir: destination (``train.bin``, ``val.bin``, ``meta.json``, ``samples.jsonl``).
        max_new_tokens: answer length cap.
        batch_size: prompts decoded together (left padding).
        val_fraction: share of prompts held out.
        chat: apply the tokenizer's chat template.
        name: the base's name, recorded in the metadata.
    """
    if not prompts:
        raise DataError("no prompts given")
    tok = engine.tokenizer
    ids = [prompt_ids(tok, p, chat) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    every = max(round(1 / val_fraction), 2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = min(tok.eos_token_ids)
    splits = SplitWriter(out, tok.vocab_size)
    samples = (out / "samples.jsonl").open("w")
    try:
        with tqdm(total=len(ids), desc="distilling", unit="prompt") as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                gens = engine.generate([ids[i] for i in idx], max_new_tokens=max_new_tokens)
                for i, g in zip(idx, gens, strict=True):
                    seq = ids[i] + [t for t in g.token_ids if t not in tok.eos_token_ids] + [eos]
                    split = "val" if i % every == every - 1 else "train"
                    splits.write(split, seq)
                    samples.write(json.dumps({"prompt": prompts[i], "split": split, "response": g.text}) + "\n")
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{gens[0].stats.tokens_per_s:.0f}")
    finally:
        splits.close()
        samples.close()
    splits.commit()
    meta = {"dtype": np.dtype(splits.dtype).name, "vocab_size": tok.vocab_size, "tokenizer": name,
            "tokens": splits.counts,
            "kind": "self-distillation", "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "val_fraction": val_fraction, "base_dtype": _dtype_name(engine)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _dtype_name(engine) -> str:
    """The precision the engine's base generated in (``float32``, ``bfloat16``), for the metadata."""
    return str(next(engine.backbone.parameters()).dtype).removeprefix("torch.")


@torch.no_grad()  # not inference mode: fit_gate differentiates through these tensors
def gate_data(backbone: torch.nn.Module, module: torch.nn.Module, windows: Sequence[tuple[Sequence[int], int]]
              ) -> dict[str, torch.Tensor]:
    """What ``fit_gate`` reads, at every module slot that has a candidate.

    Args:
        windows: (token ids, first slot to use): e.g. a prompt and the base's answer with the first slot
            of the answer, or a window of text with 0.

    Returns:
        ``fit_gate``'s keyword arguments, plus ``module_top`` / ``base_top`` / ``cand`` (N,) for reports and
        ``slots`` (one count per window: its module slots, with a candidate or not).
    """
    out: dict[str, list[torch.Tensor]] = {}
    device = next(backbone.parameters()).device
    for ids, first in tqdm(windows, desc="scoring windows", unit="window"):
        if len(ids) < 3:
            continue
        tokens = torch.tensor([list(ids)], device=device)
        logits, hidden = backbone(tokens[:, :-1])  # position t predicts x_{t+1}
        g = module(hidden, backbone.embed(tokens[:, 1:]))
        logp = module.draft_logits(backbone, g[0, :-1]).float().log_softmax(-1)  # slot i -> x_{i+2}
        base = logits[0, 1:].float()  # position i + 1 -> x_{i+2}
        cand, feats = window_proposals(tokens)
        sel = (cand[0] >= 0) & (torch.arange(cand.shape[1], device=device) >= first)
        c = cand[0, sel]
        logp_c, logp_top, top, in_draft = module_side(logp[sel], c, module.draft_vocab)
        rows = {"index_feats": feats[0, sel], "logp_c": logp_c, "logp_top": logp_top, "is_top": top == c,
                "in_draft": in_draft, "base_p_c": base[sel].softmax(-1).gather(1, c[:, None])[:, 0],
                "module_top": top, "base_top": base[sel].argmax(-1), "cand": c,
                "slots": torch.tensor([cand.shape[1] - first])}
        for k, v in rows.items():
            out.setdefault(k, []).append(v.cpu())
    if not out:
        raise ValueError("no window of at least 3 tokens to fit the copy gate on")
    return {k: torch.cat(v) for k, v in out.items()}


def fit_copy_gate(engine, prompts: Sequence[str], text_files: Sequence[str], max_new_tokens: int = 128,
                  text_tokens: int = 8192, seq_len: int = 512, chat: bool = True, batch_size: int = 8) -> dict:
    """Fit the copy gate of ``engine.module`` on the base's greedy answers to prompts and on text, and set it.

    The module's own distribution is read without a gate (any gate it had is replaced).

    Args:
        engine: ``Engine`` with the base and the module.
        prompts: user prompts (chat template applied when ``chat``); the module slots of each answer count.
        text_files: text files; the first ``text_tokens`` tokens of each, in windows of ``seq_len``.
        max_new_tokens: answer length cap.
        batch_size: prompts decoded together.

    Returns:
        A report: module slots, slots with a candidate, agreement of the module alone and with the copy
        mixture (top-1 == the base's greedy token, over every slot), and the weights.
    """
    module, tok = engine.module, engine.tokenizer
    module.set_copy_gate(None)
    windows: list[tuple[list[int], int]] = []
    ids = [prompt_ids(tok, p, chat) for p in prompts]
    with tqdm(total=len(ids), desc="base answers", unit="prompt") as bar:
        for lo in range(0, len(ids), batch_size):
            gens = engine.generate(ids[lo : lo + batch_size], max_new_tokens=max_new_tokens)
            windows += [(p + g.token_ids, len(p) - 1) for p, g in zip(ids[lo : lo + batch_size], gens, strict=True)]
            bar.update(len(gens))
    for path in text_files:
        text = read_tokens(path, tok, text_tokens)
        windows += [(text[i : i + seq_len], 0) for i in range(0, len(text), seq_len)]
    data = gate_data(engine.backbone, module, windows)
    weights = fit_gate(**{k: data[k] for k in ("index_feats", "logp_c", "logp_top", "is_top", "in_draft",
                                               "base_p_c")})
    feats = gate_features(data["index_feats"], data["logp_c"], data["logp_top"], data["is_top"], data["in_draft"])
    chosen = mixed_top(gate(weights, feats), data["logp_c"], data["logp_top"], data["cand"], data["module_top"])[2]
    slots = int(data["slots"].sum())
    module_right = int((data["module_top"] == data["base_top"]).sum())
    mixed_right = int((chosen == data["base_top"]).sum())
    module.set_copy_gate(weights)
    return {"windows": len(windows), "module_slots": slots, "with_candidate": int(data["cand"].numel()),
            "agreement_change": (mixed_right - module_right) / max(slots, 1),
            "weights": [round(float(w), 4) for w in weights]}


def copy_gate_file(engine, base: str, module: str, prompts: Sequence[str], out: str | Path,
                   text_files: Sequence[str] = (), **fit: Any) -> dict:
    """``recyclegpt copy-gate``: fit the copy gate of ``engine.module`` (``fit_copy_gate``) and save the module
    with it at ``out``, with the base identity its file records.

    Args:
        engine: ``Engine`` with the base and the module loaded from ``module``.
        base: the base's name (which shipped module ``default`` names).
        module: the module's file, or ``default``.
        prompts / text_files / fit: ``fit_copy_gate``'s prompts, text files and further options.

    Returns:
        ``out`` and ``fit_copy_gate``'s report.
    """
    from recyclegpt.checkpoint import load_module_file, save_module
    from recyclegpt.modules import resolve_module

    _, identity = load_module_file(resolve_module(module, base))
    report = fit_copy_gate(engine, prompts, text_files, **fit)
    save_module(out, engine.module, identity)
    return {"out": str(out), **report}
