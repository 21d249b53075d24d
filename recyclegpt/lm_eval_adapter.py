"""lm-evaluation-harness model ``recyclegpt``: a base with its recyclable module, scored two ways.

Needs the ``eval`` extra (``pip install 'recyclegpt[eval]'``). Importing this module registers the
model name ``recyclegpt`` with lm-eval, so ``lm_eval.simple_evaluate(model="recyclegpt",
model_args="model=smollm2-135m,module=PATH,scoring=alternating")`` works too; ``run_tasks`` runs the
local task configs (``scripts/make_tasks.py``) offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from recyclegpt.evaluate import EvalError, mixed_scores, paired_flips, score_tokens
from recyclegpt.generate import Engine
from recyclegpt.sampling import SamplingConfig

SCORINGS = ("standard", "alternating")
ITEM_METRICS = ("acc", "acc_norm")  # per-item scores run_tasks returns


@register_model("recyclegpt")
class RecycleLM(LM):
    """A RecycleGPT base (+ module) as an lm-eval ``LM``.

    Scoring of a continuation y_1 .. y_m after a context (``loglikelihood``), with x the token sequence
    context + continuation and y_i at position j = n + i - 1 (n context tokens):

    * ``standard``: every y_i by the base, log p_base(y_i | x_<j): ordinary teacher forcing.
    * ``alternating``: as alternating decoding would produce the continuation from the context as its
      prompt: y_1 (the prefill's token) by the base, y_2 by the module from (h_{j-2}, y_1), i.e.
      log p_mod(y_2 | h of the last context token, y_1), y_3 by the base, y_4 by the module from
      (h of y_2, y_3), and so on: odd i by the base, even i by the module, always teacher forced with
      the true previous tokens. ``is_greedy`` asks, token by token, whether each y_i is the top-1 of the
      model that scored it, the module's top-1 as decoding proposes it. A module with a draft vocabulary
      decodes from it and cannot emit a token outside it: its y_i is scored by the module's
      full-vocabulary head (as in ``evaluate``; until 2026-12-03 such a y_i went to the base) and is never
      greedy. ``unreachable`` collects, per task, the items with such a token in some choice: alternating
      decoding could not produce that choice at all.

    ``loglikelihood_rolling`` cuts the text into lm-eval's disjoint rolling windows (full context of
    ``max_length``) and scores each window's new tokens as one continuation, so under ``alternating``
    the phase restarts with the base at every window. ``generate_until`` decodes with the ``standard``
    or ``alternating`` strategy to match; sampling only when the task asks for ``do_sample`` with a
    temperature > 0.

    Args:
        backbone: native or wrapped backbone.
        tokenizer: the base's tokenizer (``encode``, ``decode``, ``eos_token_ids``, ``pad_token_id``).
        module: the recyclable module (required for ``alternating``).
        scoring: ``standard`` or ``alternating``.
        batch_size: sequences per forward in ``loglikelihood``.
        max_length: most tokens one forward reads (defaults to the backbone's context); contexts are cut
            on the left to fit.
    """

    def __init__(
        self, backbone: torch.nn.Module, tokenizer, module: torch.nn.Module | None = None,
        scoring: str = "standard", batch_size: int = 4, max_length: int | None = None,
    ) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise EvalError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        if scoring == "alternating" and module is None:
            raise EvalError("scoring 'alternating' needs a recyclable module")
        self.engine = Engine(backbone, tokenizer, module)
        self.scoring = scoring
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or backbone.config.max_seq_len)
        eos = sorted(tokenizer.eos_token_ids)
        # What an empty context (and the first rolling window) is conditioned on: the BOS where the model
        # starts its inputs with one, else the end of a previous text.
        bos = tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else eos[0] if eos else tokenizer.pad_token_id
        self._device = next(backbone.parameters()).device
        self.unreachable: dict[str, set[int]] = {}  # task -> doc ids with a token alternating cannot emit

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RecycleLM:
        """Build from lm-eval's ``model_args``: ``model=NAME,module=PATH,scoring=...,backend=...,batch_size=N``.

        Of ``additional_config`` (lm-eval's own options) only ``batch_size`` is used, when given.
        """
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size is not None and "batch_size" not in args:
            args["batch_size"] = int(batch_size)
        return cls.load(**args)

    @classmethod
    def load(cls, model: str, module: str | None = None, backend: str = "auto", **kwargs) -> RecycleLM:
        """Load a base by name or path (and a module file, or ``default`` for the shipped one)."""
        from recyclegpt import load

        engine = load(model, module, backend)
        return cls(engine.backbone, engine.tokenizer, engine.module, **kwargs)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); spaces ending the context move to the continuation.

        The context starts with the model's BOS where it expects one (an empty context is the prefix
        token alone); the continuation's ids are the suffix of the whole text's, never with a BOS.
        """
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        encode = self.engine.tokenizer.encode
        ctx = encode(context) if context else []
        whole = encode(context + continuation, bos=bool(context))
        cont = whole[len(ctx) :]
        return ([self.prefix_token_id] if not ctx else ctx), cont

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool, bool]]:
        """(log-likelihood, is_greedy, reachable) of each continuation after its context, token ids in,
        batched; ``reachable`` is False where a module token of the continuation is one alternating decoding
        cannot emit (always True under ``standard``)."""
        module = self.engine.module if self.scoring == "alternating" else None
        results: list[tuple[float, bool, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            seqs, starts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise EvalError("an empty continuation cannot be scored")
                if len(cont) > self.max_length:
                    raise EvalError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
                seq = (ctx + cont)[-(self.max_length + 1) :]  # the last token is only a target
                seqs.append(seq)
                starts.append(len(seq) - len(cont))
            width = max(3, max(len(s) for s in seqs))
            pad = self.engine.tokenizer.pad_token_id
            tokens = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self._device)
            s = score_tokens(self.engine.backbone, module, tokens)
            nll, top, miss = s.base_nll, s.base_top, torch.zeros_like(s.base_top, dtype=torch.bool)
            if module is not None:
                j = torch.arange(1, width, device=self._device)  # target positions
                start = torch.tensor(starts, device=self._device)[:, None]
                mixed = mixed_scores(s, (j > start) & ((j - start) % 2 == 1))
                nll, top, miss = mixed.nll, mixed.top, mixed.from_module & ~mixed.emittable
            for row, (i, seq, n) in enumerate(zip(idx, seqs, starts, strict=True)):
                k = slice(n - 1, len(seq) - 1)  # the continuation's targets (index = position - 1)
                greedy = bool((top[row, k] == tokens[row, n:len(seq)]).all())
                results[i] = (-float(nll[row, k].sum()), greedy, not bool(miss[row, k].any()))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, and whether it is the greedy continuation."""
        scored = self.score_pairs([self._encode_pair(*r.args) for r in requests])
        for r, (_, _, reachable) in zip(requests, scored, strict=True):
            if not reachable:
                self.unreachable.setdefault(r.task_name, set()).add(r.doc_id)
        return [(ll, greedy) for ll, greedy, _ in scored]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Log-probability of each whole text, in disjoint rolling windows of ``max_length`` tokens."""
        out = []
        for r in requests:
            ids = self.engine.tokenizer.encode(r.args[0], bos=False)  # the first window's context is the prefix
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, self.prefix_token_id, self.max_length, context_len=1)]
            out.append(sum(ll for ll, _, _ in self.score_pairs(windows)))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Decode each context until a stop string or ``max_gen_toks`` (default 256) tokens."""
        out = []
        strategy = "alternating" if self.scoring == "alternating" else "standard"
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            room = self.engine.backbone.config.max_seq_len - max_new - 1
            if room < 1:
                raise EvalError(f"max_gen_toks {max_new} leaves no room for a prompt in this model's context")
            ids = self.engine.tokenizer.encode(context)[-room:] or [self.prefix_token_id]
            g = self.engine.generate([ids], strategy, max_new, SamplingConfig(temperature=temperature, seed=0),
                                     stop=until)[0]
            out.append(g.text)
        return out


def load_task_configs(tasks_dir: str | Path, names: Sequence[str] | None = None) -> list[dict]:
    """The YAML task configs of a directory, their ``data_files`` made absolute (relative to the YAML).

    Args:
        tasks_dir: directory of ``*.yaml`` configs (e.g. ``benchmarks/tasks``).
        names: task names to keep (``task:`` field); None keeps all.

    Raises:
        EvalError: no configs, or a requested name that is not there.
    """
    d = Path(tasks_dir)
    configs = {}
    for path in sorted(d.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        kwargs = cfg.get("dataset_kwargs") or {}
        if "data_files" in kwargs:
            kwargs["data_files"] = {k: str((path.parent / v).resolve()) for k, v in kwargs["data_files"].items()}
        configs[cfg["task"]] = cfg
    if not configs:
        raise EvalError(f"no task configs (*.yaml) in {d}; generate them with scripts/make_tasks.py")
    missing = sorted(set(names or ()) - set(configs))
    if missing:
        raise EvalError(f"unknown task(s) {missing}; tasks in {d}: {', '.join(configs)}")
    return [configs[n] for n in (names or configs)]


def run_tasks(lm: LM, tasks_dir: str | Path, names: Sequence[str] | None = None,
              limit: int | None = None) -> tuple[dict, dict]:
    """Run local task configs with lm-eval; returns its per-task ``results`` and the per-item scores.

    The data are local JSONL files read by ``datasets``' json builder, so no network is needed; to
    rule out any hub lookup, set ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` before this module
    is imported (``recyclegpt lm-eval`` does).

    Args:
        lm: a ``RecycleLM`` (or any lm-eval ``LM``).
        tasks_dir: directory of YAML configs and their JSONL data.
        names: task names; None runs every config in the directory.
        limit: items per task (None: all).

    Returns:
        (results, items): ``items[task][metric]`` lists each item's score (0 or 1) in the task file's
        order, for the metrics ``acc`` and ``acc_norm`` where the task has them; two scorings of one
        task compare item by item with ``evaluate.paired_flips``.
    """
    configs = load_task_configs(tasks_dir, names)
    out = simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False), limit=limit,
                          bootstrap_iters=0, log_samples=True)
    items = {}
    for task, samples in out["samples"].items():
        samples = sorted(samples, key=lambda x: x["doc_id"])
        items[task] = {m: [int(x[m]) for x in samples] for m in ITEM_METRICS if samples and m in samples[0]}
    return out["results"], items


def score_tasks(engine: Engine, tasks_dir: str | Path, names: Sequence[str] | None = None,
                scorings: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 4) -> dict:
    """Run local tasks under each scoring and compare standard with alternating item by item.

    Args:
        engine: the base and (for ``alternating``) its module, as ``recyclegpt.load`` returns them.
        tasks_dir / names / limit: as ``run_tasks``.
        scorings: among ``SCORINGS``; None: both with a module, else ``standard``.
        batch_size: sequences per forward.

    Returns:
        ``results`` (scoring -> task -> lm-eval's metrics), ``paired`` (with both scorings: task -> metric ->
        ``evaluate.paired_flips``, which items the module's scoring lost and won), ``unreachable_items`` (task ->
        items with a choice alternating decoding cannot produce) and ``items`` (scoring -> ``run_tasks``' items).
    """
    results, items, unreachable = {}, {}, {}
    for scoring in scorings or (SCORINGS if engine.module is not None else ["standard"]):
        lm = RecycleLM(engine.backbone, engine.tokenizer, engine.module, scoring, batch_size)
        results[scoring], items[scoring] = run_tasks(lm, tasks_dir, names, limit)
        if scoring == "alternating":
            unreachable = {task: len(lm.unreachable.get(task, ())) for task in items[scoring]}
    paired = {}
    if len(items) == 2:
        paired = {task: {m: paired_flips(v, items["alternating"][task][m]) for m, v in metrics.items()}
                  for task, metrics in items["standard"].items()}
    return {"results": results, "paired": paired, "unreachable_items": unreachable, "items": items}


def format_scores(scores: dict) -> str:
    """``score_tasks``' result as lines: each scoring's metrics per task, then each paired comparison."""
    lines = []
    for scoring, tasks in scores["results"].items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            lines.append(f"{scoring:12s} {task:32s} {shown}")
    for task, metrics in scores["paired"].items():
        for m, f in metrics.items():
            lines.append(f"{'paired':12s} {task:32s} {m} {f['standard']:.4f} -> {f['alternating']:.4f} "
                         f"({f['diff_points']:+.1f} points; {f['right_to_wrong']} right->wrong, "
                         f"{f['wrong_to_right']} wrong->right; McNemar p {f['mcnemar_p']:.3f})")
    return "\n".join(lines)
