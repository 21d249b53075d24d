"""Evaluation of a base and its recyclable module: perplexity, module agreement, tokens per full call.

Notation (as in ``recycle.py``): in a window x_0 .. x_{T-1}, the base scores x_j (j >= 1) with
p_base(x_j | x_<j), read from h_{j-1}; the module scores x_j (j >= 2) with p_mod(x_j | h_{j-2}, x_{j-1}),
exactly the distribution alternating decoding draws the module's token from (``draft_logits``: with a
draft vocabulary, tokens outside it have probability 0; with a copy gate, mixed with the token copied
from the context, ``copy_gate.py``, which may lie outside it). Everything is teacher forced: one backbone
forward per window, the module over the pairs (h_t, x_{t+1}) in the same pass.

* **Perplexity of the base**: exp(mean_j -log p_base(x_j | x_<j)) over windows of ``seq_len`` tokens.
* **Perplexity under the alternating scheme**: the same targets, but the odd positions j = 3, 5, 7 ...
  of each window are scored by the module instead of the base (the first two targets, j = 1 and 2,
  and every even j stay with the base): base token, module token, base token...
  ``ppl_relative_increase`` = alternating / base - 1. Every module position is the module's. A module
  with a draft vocabulary decodes from it and cannot emit a target outside it (probability 0 there), so
  for likelihoods the module is scored with its **full-vocabulary head** (the same states through the
  base's whole head, copy gate mixed as in decoding); ``draft_vocab_coverage`` is the share of module
  positions whose target alternating decoding can emit at all (the rest are certain misses, which
  ``agreement`` and the top-1 figures count as such). Until 2026-12-03 those positions were handed to
  the base instead, which flatters the module: that figure is kept as ``ppl_alternating_base_fallback``
  to compare with earlier results.
* **Agreement**: how often the module's top-1 for x_{t+2} equals the base's greedy choice for x_{t+2}
  given the true x_{t+1} (argmax of recycle logits at t == argmax of base logits at t+1), on natural
  text and on the base's own greedy answers to prompts, where it is the chance that alternating
  decoding's module token is the one standard decoding would have produced. Answers stored by
  ``data distill`` can be scored the same way without decoding them again (``answer_metrics``).
* **Early-exit agreement** (``early_exit_agreement``): how often the next-token argmax read after the first k
  logical layers (``Backbone.early_logits``) equals the whole model's greedy token, the draft quality of
  early-layer speculation (SPEED).
* **tau / acceptance rate** of verified greedy decoding on the prompts (``DecodeStats``): tokens per
  full-model forward (prefill included) and the share of drafts kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from recyclegpt.copy_gate import mix_scores, window_proposals
from recyclegpt.data import distilled_answers, prompt_ids, read_tokens


class EvalError(ValueError):
    """An evaluation request cannot be run as given (no module, too little text, bad window size...)."""


@dataclass
class TokenScores:
    """Teacher-forced scores of a batch of token windows (B, T).

    Index i of the base tensors is target position j = i + 1; index i of the module tensors is
    target position j = i + 2.

    Attributes:
        base_nll: (B, T-1) -log p_base(x_j | x_<j) for j = 1 .. T-1.
        base_top: (B, T-1) the base's greedy choice for position j.
        module_nll: (B, T-2) -log p_mod(x_j | h_{j-2}, x_{j-1}) for j = 2 .. T-1, the distribution decoding
            draws from (inf where a draft vocabulary cannot emit x_j); None without a module.
        module_top: (B, T-2) the module's top-1 for position j, as decoding proposes it; None without a module.
        module_nll_full: (B, T-2) the same under the module's full-vocabulary head (always finite); equal to
            ``module_nll`` for a module without a draft vocabulary; None without a module.
    """

    base_nll: torch.Tensor
    base_top: torch.Tensor
    module_nll: torch.Tensor | None = None
    module_top: torch.Tensor | None = None
    module_nll_full: torch.Tensor | None = None


def score_tokens(backbone: torch.nn.Module, module: torch.nn.Module | None, tokens: torch.Tensor) -> TokenScores:
    """Score every position of token windows (B, T), T >= 3, by the base and (if given) by the module.

    The backbone reads x_0 .. x_{T-2} (the last token is only a target, so T may be the context + 1);
    the module reads the pairs (h_t, x_{t+1}) of that forward (``module_scores``).
    """
    if tokens.shape[1] < 3:
        raise EvalError(f"windows need at least 3 tokens (the module looks two ahead), got {tokens.shape[1]}")
    with torch.inference_mode():
        logits, hidden = backbone(tokens[:, :-1])  # (B, T-1, V), (B, T-1, d): position t predicts x_{t+1}
        base_nll, base_top = _nll_top(logits, tokens[:, 1:])
    if module is None:
        return TokenScores(base_nll, base_top)
    nll, top, full = module_scores(backbone, module, tokens, hidden, full_vocab=True)
    return TokenScores(base_nll, base_top, nll, top, nll if full is None else full)


def module_scores(backbone: torch.nn.Module, module: torch.nn.Module, tokens: torch.Tensor, hidden: torch.Tensor,
                  full_vocab: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The module's (nll, top-1, full-vocabulary nll), each (B, T-2), for targets x_2 .. x_{T-1} of windows
    (B, T), given the backbone's final hidden states (B, T-1, d) over x_0 .. x_{T-2} (so several modules can
    share one base pass).

    The module reads ``module(hidden, embed(tokens[:, 1:]))`` as in training; its logits are
    ``module.draft_logits``, what decoding samples from (``backbone.head`` of the module states when it has
    no draft vocabulary), mixed with in-context copies when the module has a copy gate
    (``copy_gate.mix_scores``, as decoding's ``copy_logits``). With ``full_vocab`` and a draft vocabulary the
    same states also go through the whole head for the third element; otherwise it is None.
    """
    with torch.inference_mode():
        g = module(hidden, backbone.embed(tokens[:, 1:]))[:, :-1]  # pairs (h_t, x_{t+1}), t = 0 .. T-3
        # (t = T-2 would predict x_T, past the window: dropped.)
        nll, top = _mixed_nll_top(module, module.draft_logits(backbone, g), tokens)  # (B, T-2) each
        if not full_vocab or getattr(module, "draft_vocab", None) is None:
            return nll, top, None
        return nll, top, _mixed_nll_top(module, backbone.head(g), tokens)[0]


def _mixed_nll_top(module: torch.nn.Module, logits: torch.Tensor, tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and top-1 of the module's logits (B, T-2, V) for targets x_2 .., with its copy gate if it has one."""
    if getattr(module, "copy_gate", None) is None:
        return _nll_top(logits, tokens[:, 2:])
    cand, feats = window_proposals(tokens)
    return mix_scores(logits, tokens[:, 2:], cand, feats, module.copy_gate, module.draft_vocab)


def _nll_top(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy (inf where the target has logit -inf) and argmax; logits (B, n, V)."""
    B, n, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * n, V).float(), targets.reshape(B * n), reduction="none")
    return nll.view(B, n), logits.argmax(-1)


def module_positions(T: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (T-1,) over targets j = 1 .. T-1: True where the alternating scheme uses the module (odd j >= 3)."""
    j = torch.arange(1, T, device=device)
    return (j % 2 == 1) & (j >= 3)


@dataclass
class MixedScores:
    """Per-target scores (B, T-1) of windows when some targets are the module's (``mixed_scores``).

    Attributes:
        nll: the module's full-vocabulary NLL at its targets, the base's elsewhere.
        top: the module's top-1 as decoding proposes it at its targets, the base's greedy choice elsewhere.
        from_module: the module's targets (``use_module`` without j = 1).
        emittable: the module's targets that alternating decoding can emit (inside the draft vocabulary or
            the copy candidate); at the others the module misses for certain.
        nll_base_fallback: the rule used until 2026-12-03: the module's draft NLL where ``emittable``, the
            base's NLL everywhere else (flattering: decoding cannot hand such a target to the base).
    """

    nll: torch.Tensor
    top: torch.Tensor
    from_module: torch.Tensor
    emittable: torch.Tensor
    nll_base_fallback: torch.Tensor


def mixed_scores(scores: TokenScores, use_module: torch.Tensor) -> MixedScores:
    """Per-target scores when the targets marked in ``use_module`` are the module's, scored as decoded.

    Args:
        scores: base and module scores of windows (B, T).
        use_module: bool (B or 1, T-1) over targets j = 1 .. T-1; j = 1 cannot be the module's.
    """
    if scores.module_nll is None:
        raise EvalError("mixed scoring needs module scores; pass a module to score_tokens")

    def realign(x: torch.Tensor) -> torch.Tensor:  # module index i is target i + 2 -> index i + 1
        return torch.cat([x[:, :1], x], 1)

    use = use_module.clone()
    use[..., 0] = False
    m_nll, m_top, m_full = realign(scores.module_nll), realign(scores.module_top), realign(scores.module_nll_full)
    emittable = use & m_nll.isfinite()
    return MixedScores(nll=torch.where(use, m_full, scores.base_nll), top=torch.where(use, m_top, scores.base_top),
                       from_module=use, emittable=emittable,
                       nll_base_fallback=torch.where(emittable, m_nll, scores.base_nll))


def paired_flips(standard: Sequence[float], alternating: Sequence[float]) -> dict:
    """Compare two scorings of the same task items, item by item (each score 0 or 1).

    Returns the accuracies, their difference in points (alternating - standard), how many items
    each way changed (``right_to_wrong``: standard right, alternating wrong; ``wrong_to_right``: the
    reverse), and the exact two-sided McNemar p-value: the chance, if neither scoring were better,
    of a split of the changed items at least this uneven (binomial, n = changed items, p = 1/2).

    Raises:
        EvalError: the two lists differ in length, are empty, or hold a score other than 0 or 1.
    """
    if len(standard) != len(alternating) or not standard:
        raise EvalError(f"paired scores need two equally long, non-empty lists; got {len(standard)} and "
                        f"{len(alternating)} items")
    if any(x not in (0, 1) for x in (*standard, *alternating)):
        raise EvalError("paired scores must each be 0 or 1 (an item wrong or right)")
    r2w = sum(1 for a, b in zip(standard, alternating, strict=True) if a and not b)
    w2r = sum(1 for a, b in zip(standard, alternating, strict=True) if b and not a)
    return paired_summary(len(standard), int(sum(standard)), int(sum(alternating)), r2w, w2r)


def paired_summary(items: int, right_standard: int, right_alternating: int, right_to_wrong: int,
                   wrong_to_right: int) -> dict:
    """``paired_flips``' result from counts: item totals and changed items, which add up over disjoint item
    sets (several runs of one task pool by summing them)."""
    n = right_to_wrong + wrong_to_right
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(right_to_wrong, wrong_to_right) + 1)) / 2**n)
    acc_std, acc_alt = right_standard / items, right_alternating / items
    return {"items": items, "standard": acc_std, "alternating": acc_alt, "diff_points": 100 * (acc_alt - acc_std),
            "right_to_wrong": right_to_wrong, "wrong_to_right": wrong_to_right, "mcnemar_p": p}


def _window_batches(token_ids: Sequence[int], seq_len: int, batch_size: int, device: torch.device | str,
                   min_len: int = 1) -> list[torch.Tensor]:
    """Text cut into disjoint windows of ``seq_len`` tokens (a last window shorter than ``min_len`` dropped),
    as (B, T) tensors of at most ``batch_size`` windows of one length each (only the last window can be shorter).

    Raises:
        EvalError: fewer than ``min_len`` tokens.
    """
    windows = [list(token_ids[i : i + seq_len]) for i in range(0, len(token_ids), seq_len)]
    windows = [w for w in windows if len(w) >= min_len]
    if not windows:
        raise EvalError(f"too little text: {len(token_ids)} tokens, at least {min_len} are needed")
    return [torch.tensor([w for w in windows[lo : lo + batch_size] if len(w) == length], device=device)
            for lo in range(0, len(windows), batch_size)
            for length in sorted({len(w) for w in windows[lo : lo + batch_size]})]


def text_metrics(
    backbone: torch.nn.Module, module: torch.nn.Module, token_ids: Sequence[int], seq_len: int = 512,
    batch_size: int = 2,
) -> dict[str, float]:
    """Perplexities (base, alternating) and module agreement on text, in disjoint windows of ``seq_len``.

    Each window is scored on its own (its first token has no context); a last window shorter than
    3 tokens is dropped.

    Returns:
        ``tokens`` scored, ``windows``, ``ppl_base``, ``ppl_alternating`` (module positions scored by the
        module's full-vocabulary head, see the module docstring), ``ppl_relative_increase``,
        ``ppl_alternating_base_fallback`` (the flattering rule used until 2026-12-03), ``module_positions``
        (targets the alternating scheme gives the module), ``draft_vocab_coverage`` (share of those the
        module can emit as it decodes; 1 without a draft vocabulary), ``ppl_base_at_module_positions`` and
        ``ppl_module_at_module_positions`` (the two models on all module positions, the module by its
        full-vocabulary head), ``agreement`` (module top-1 == base greedy next-next token),
        ``module_top1_acc`` and ``base_top1_acc`` (against the text, for the same targets x_{t+2}).
    """
    limit = backbone.config.max_seq_len + 1  # the last token of a window is only a target
    if not 3 <= seq_len <= limit:
        raise EvalError(f"seq_len must be in [3, {limit}] (the model's context + 1), got {seq_len}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    device = next(backbone.parameters()).device
    batches = _window_batches(token_ids, seq_len, batch_size, device, min_len=3)
    keys = ("base", "alt", "alt_fallback", "n", "mod_base", "mod_mod", "n_mod", "n_covered", "agree", "mod_ok",
            "base_ok", "n_pair")
    sums = dict.fromkeys(keys, 0.0)
    for tokens in batches:
        length = tokens.shape[1]
        s = score_tokens(backbone, module, tokens)
        use_module = module_positions(length, device)[None].expand(len(tokens), -1)
        mixed = mixed_scores(s, use_module)
        use = mixed.from_module
        sums["base"] += float(s.base_nll.sum())
        sums["alt"] += float(mixed.nll.sum())
        sums["alt_fallback"] += float(mixed.nll_base_fallback.sum())
        sums["n"] += s.base_nll.numel()
        sums["mod_base"] += float(s.base_nll[use].sum())
        sums["mod_mod"] += float(mixed.nll[use].sum())
        sums["n_mod"] += int(use.sum())
        sums["n_covered"] += int(mixed.emittable.sum())
        sums["agree"] += float((s.module_top == s.base_top[:, 1:]).sum())
        sums["mod_ok"] += float((s.module_top == tokens[:, 2:]).sum())
        sums["base_ok"] += float((s.base_top[:, 1:] == tokens[:, 2:]).sum())
        sums["n_pair"] += s.module_top.numel()
    ppl_base, ppl_alt = math.exp(sums["base"] / sums["n"]), math.exp(sums["alt"] / sums["n"])
    n_mod = max(sums["n_mod"], 1)
    return {
        "tokens": int(sums["n"]),
        "windows": sum(len(t) for t in batches),
        "ppl_base": ppl_base,
        "ppl_alternating": ppl_alt,
        "ppl_relative_increase": ppl_alt / ppl_base - 1,
        "ppl_alternating_base_fallback": math.exp(sums["alt_fallback"] / sums["n"]),
        "module_positions": int(sums["n_mod"]),
        "draft_vocab_coverage": sums["n_covered"] / n_mod,
        "ppl_base_at_module_positions": math.exp(sums["mod_base"] / n_mod),
        "ppl_module_at_module_positions": math.exp(sums["mod_mod"] / n_mod),
        "agreement": sums["agree"] / sums["n_pair"],
        "module_top1_acc": sums["mod_ok"] / sums["n_pair"],
        "base_top1_acc": sums["base_ok"] / sums["n_pair"],
    }


def early_exit_agreement(
    backbone: torch.nn.Module, token_ids: Sequence[int], layer: int, seq_len: int = 512, batch_size: int = 2,
    top: int = 1,
) -> float:
    """Share of positions where the whole model's greedy token is the argmax (with ``top`` k: among the k most
    likely tokens) of the next-token prediction after the first ``layer`` logical layers
    (``Backbone.early_logits``), over disjoint windows of ``seq_len`` tokens of text (each scored on its own,
    every position counted). With ``top`` = W it is how often ``--strategy speed`` at width W would keep its
    speculation on that text.

    Raises:
        EvalError: a backbone without early exit (wrapped transformers models), a layer outside
            1 .. n_layers, a window longer than the context, or no text.
    """
    if not hasattr(backbone, "early_logits"):
        raise EvalError(f"{type(backbone).__name__} has no early exit: early-exit agreement needs a native Backbone")
    depth, context = backbone.config.n_layers, backbone.config.max_seq_len
    if not 1 <= layer <= depth:
        raise EvalError(f"layer must be in [1, {depth}] (the model's logical layers), got {layer}")
    if not 1 <= seq_len <= context or batch_size < 1 or top < 1:
        raise EvalError(f"seq_len must be in [1, {context}], batch_size and top >= 1, got {seq_len}, {batch_size} "
                        f"and {top}")
    agree = positions = 0
    with torch.inference_mode():
        for tokens in _window_batches(token_ids, seq_len, batch_size, next(backbone.parameters()).device):
            logits, _, early = backbone(tokens, exit_layer=layer)  # (B, T, V), _, (B, T, d)
            guesses = backbone.early_logits(early).topk(top, -1).indices  # (B, T, top)
            agree += int((guesses == logits.argmax(-1, keepdim=True)).any(-1).sum())
            positions += tokens.numel()
    return agree / positions


def generation_metrics(
    engine, prompts: Sequence[str], max_new_tokens: int = 128, chat: bool = False, draft_len: int = 1,
    draft_width: int = 1,
) -> dict[str, float]:
    """Module agreement on the base's own greedy answers, and tau / acceptance of verified decoding.

    For each prompt (chat template applied when ``chat``): decode greedily with ``standard``,
    teacher-force prompt + answer and compare the module's top-1 with the base's greedy token at every
    answer position the module would draft in alternating decoding (targets after the first answer
    token); then decode again with ``verified`` (``draft_len`` drafts per full call, ``draft_width``
    candidates for the first) and add up its
    ``DecodeStats``.

    Args:
        engine: ``Engine`` with a module.
        prompts: user prompts.
        max_new_tokens: answer length cap.
        chat: apply the tokenizer's chat template.
        draft_len: module steps per full call of the verified run.
        draft_width: candidates for the first draft's slot in the verified run.

    Returns:
        ``prompts``, ``generated_tokens``, ``agreement``, ``tau`` (tokens per full call), ``acceptance_rate``
        (drafts kept / drafted), ``full_calls``, ``drafted``, ``accepted`` and ``verified_identical`` (share
        of prompts whose verified output equals the standard output, 1.0 if lossless).
    """
    if engine.module is None:
        raise EvalError("generation metrics need a recyclable module; pass --module PATH")
    if not prompts:
        raise EvalError("no prompts given")
    tok = engine.tokenizer
    agree = pairs = generated = new = calls = drafted = accepted = identical = 0
    for prompt in prompts:
        ids = prompt_ids(tok, prompt, chat)
        std = engine.generate([ids], "standard", max_new_tokens=max_new_tokens)[0]
        generated += len(std.token_ids)
        hits = _answer_hits(engine.backbone, [engine.module], ids, std.token_ids)
        agree, pairs = agree + int(hits.sum()), pairs + hits.shape[1]
        ver = engine.generate([ids], "verified", max_new_tokens=max_new_tokens, draft_len=draft_len,
                              draft_width=draft_width)[0]
        new += ver.stats.new_tokens
        calls += ver.stats.full_calls
        drafted += ver.stats.drafted
        accepted += ver.stats.accepted
        identical += ver.token_ids == std.token_ids
    return {
        "prompts": len(prompts),
        "generated_tokens": generated,
        "agreement": agree / max(pairs, 1),
        "tau": new / max(calls, 1),
        "acceptance_rate": accepted / max(drafted, 1),
        "full_calls": calls,
        "drafted": drafted,
        "accepted": accepted,
        "verified_identical": identical / len(prompts),
    }


def _answer_hits(backbone, modules: Sequence[torch.nn.Module], prompt: Sequence[int], answer: Sequence[int]
                 ) -> torch.Tensor:
    """Bool (len(modules), slots): whether each module's top-1 equals the base's greedy token, at every
    answer position the module would draft in alternating decoding (after the first answer token), teacher
    forced; the modules share one backbone pass."""
    if len(answer) < 2:
        return torch.zeros(len(modules), 0, dtype=torch.bool)
    device = next(backbone.parameters()).device
    tokens = torch.tensor([[*prompt, *answer]], device=device)
    with torch.inference_mode():
        logits, hidden = backbone(tokens[:, :-1])  # position t predicts x_{t+1}
    p = len(prompt)  # base index p predicts x_{p+1}, the second answer token; so does module index p-1
    greedy = logits[0, p:].argmax(-1)
    return torch.stack([module_scores(backbone, m, tokens, hidden)[1][0, p - 1 :] == greedy for m in modules]).cpu()


def answer_metrics(backbone, module, answers: Sequence[tuple[Sequence[int], Sequence[int]]], resamples: int = 2000,
                   seed: int = 0, compare: Sequence[torch.nn.Module] = ()) -> dict:
    """Module agreement on stored greedy answers of the base (``data.distilled_answers``), as
    ``generation_metrics`` counts it, without decoding them again: thousands of answers in minutes.

    Args:
        compare: further modules for the same base, each scored on the same slots in the same base pass
            for a paired comparison with ``module``.

    Returns:
        ``prompts``, ``slots``, ``agreement`` and ``agreement_ci95``: the 2.5th and 97.5th percentiles of the
        agreement over ``resamples`` bootstrap resamples of the answers (the answers are the unit that varies).
        With ``compare``, also ``compare``: a list with one dict per module: its ``agreement`` and
        ``agreement_ci95``, the ``difference`` (it - module) with its interval over the same resamples (paired:
        both modules are resampled together, so the interval is far narrower than either agreement's), and the
        slots only one of the two gets right (``only_module_right``, ``only_compare_right``).
    """
    if module is None:
        raise EvalError("answer agreement needs a recyclable module; pass --module PATH")
    modules = [module, *compare]
    # The bar counts tokens, not answers: distilled answers come sorted by prompt length, so a count of
    # answers would run fast early and promise an end too soon.
    rows, only = [], torch.zeros(len(compare), 2, dtype=torch.long)  # per compared module: only module / it right
    with tqdm(total=sum(len(p) + len(a) for p, a in answers), desc="scoring answers", unit="tok",
              unit_scale=True) as bar:
        for p, a in answers:
            hits = _answer_hits(backbone, modules, p, a)
            if hits.shape[1]:
                rows.append([*hits.sum(1).tolist(), hits.shape[1]])
                for i, other in enumerate(hits[1:]):
                    only[i] += torch.stack([hits[0] & ~other, other & ~hits[0]]).sum(1)
            bar.update(len(p) + len(a))
    if not rows:
        raise EvalError("no stored answer has the 2 tokens a module slot needs")
    counts = torch.tensor(rows, dtype=torch.float64)  # (answers, modules + 1): slots right per module, slots
    draws = torch.randint(0, len(counts), (resamples, len(counts)), generator=torch.Generator().manual_seed(seed))
    sampled = counts[draws].sum(1)  # (resamples, modules + 1)
    boot = sampled[:, :-1] / sampled[:, -1:]
    agreement = counts[:, :-1].sum(0) / counts[:, -1].sum()

    def ci(x: torch.Tensor) -> list[float]:
        return [float(x.quantile(0.025)), float(x.quantile(0.975))]

    out = {"prompts": len(counts), "slots": int(counts[:, -1].sum()), "agreement": float(agreement[0]),
           "agreement_ci95": ci(boot[:, 0])}
    if compare:
        out["compare"] = [{
            "agreement": float(agreement[i]), "agreement_ci95": ci(boot[:, i]),
            "difference": float(agreement[i] - agreement[0]), "difference_ci95": ci(boot[:, i] - boot[:, 0]),
            "only_module_right": int(only[i - 1, 0]), "only_compare_right": int(only[i - 1, 1]),
        } for i in range(1, len(modules))]
    return out


def check_request(module: bool, data, prompts, answers, compare) -> None:
    """Refuse an evaluation that cannot run, before anything loads: without a module, with nothing to score
    (no ``data``, ``prompts`` or ``answers``), or with modules to ``compare`` but no ``answers``.

    Raises:
        EvalError: saying what to pass.
    """
    if not module:
        raise EvalError("evaluation needs a recyclable module; pass --module PATH (or 'default')")
    if data is None and prompts is None and answers is None:
        raise EvalError("evaluation needs something to score: --text FILE, --prompts FILE or --answers DIR (or "
                        "several)")
    if compare and answers is None:
        raise EvalError("--compare-module scores other modules on stored answers: give --answers DIR too")


def evaluate(
    engine, data: str | Path | None, prompts: Sequence[str] | None = None, max_tokens: int = 20_000, seq_len: int = 512,
    batch_size: int = 2, max_new_tokens: int = 128, chat: bool = False, draft_len: int = 1, draft_width: int = 1,
    answers=None, compare: dict[str, torch.nn.Module] | None = None,
) -> dict:
    """Every metric of this module in one JSON-ready dict.

    Args:
        engine: ``Engine`` (backbone, tokenizer, module); the module is required.
        data: text file for the perplexities and agreement on natural text; None skips them (null fields).
        prompts: prompts for agreement on generations, tau and acceptance; None skips them (null fields).
        max_tokens: tokens of ``data`` to use (from its start).
        seq_len: window length for the perplexities.
        batch_size: windows per forward.
        max_new_tokens: answer length for the generation metrics.
        chat: apply the chat template to prompts.
        draft_len: drafts per full call of the verified run.
        draft_width: candidates for the first draft's slot in the verified run.
        answers: a ``data distill`` output made with this base (``data.open_distilled``): agreement on its stored
            answers (``answer_metrics``); None skips it.
        compare: with ``answers``, further modules of the same base by name, each compared with the module on
            the same answer slots.

    Returns:
        ``{"data", "max_tokens", "seq_len", "text": {...} or None, "generations": {...} or None, "max_new_tokens",
        "chat", "draft_len", "draft_width"}``, and ``answers`` (with each compared module's ``module`` name) when
        ``answers`` is given.

    Raises:
        EvalError: no module, nothing to score, ``compare`` without ``answers``, or ``max_tokens`` < 3.
    """
    check_request(engine.module is not None, data, prompts, answers, compare)
    if max_tokens < 3:
        raise EvalError(f"max_tokens must be >= 3, got {max_tokens}")
    text = None if data is None else text_metrics(
        engine.backbone, engine.module, read_tokens(data, engine.tokenizer, max_tokens), seq_len, batch_size
    )
    gens = None if prompts is None else generation_metrics(
        engine, prompts, max_new_tokens, chat, draft_len, draft_width
    )
    out = {"data": None if data is None else str(data), "max_tokens": max_tokens, "seq_len": seq_len, "text": text,
           "generations": gens, "max_new_tokens": max_new_tokens, "chat": chat, "draft_len": draft_len,
           "draft_width": draft_width}
    if answers is not None:
        compare = compare or {}
        metrics = answer_metrics(engine.backbone, engine.module, distilled_answers(answers, engine.tokenizer, chat),
                                 compare=list(compare.values()))
        if compare:
            metrics["compare"] = [{"module": name, **m} for name, m in zip(compare, metrics["compare"], strict=True)]
        out["answers"] = {"dir": str(answers.dir), **metrics}
    return out
