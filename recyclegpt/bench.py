"""Decode-speed benchmark: RecycleGPT's strategies against transformers and llama.cpp on the same base.

Rows: ``standard`` (the reference of every ratio), ``alternating``, ``verified`` (one row per draft
length), ``adaptive`` (one row per threshold), ``lookup``, and the baselines users would run instead, fed
the same token ids: transformers' greedy ``generate`` and its prompt-lookup decoding
(``prompt_lookup_num_tokens=10``) on the same weights, and llama.cpp's greedy decoding of the base's GGUF
file in its Q4_0 and Q8_0 formats (``llama-cpp-q4_0``, ``llama-cpp-q8_0``; needs llama-cpp-python).

Timing rules: each row first runs once on the first prompt (priming: weights paged in, lazy allocations
made), then one warm-up pass (every row on every prompt); neither is timed. Then, for each repetition,
for each prompt, every row runs once, so drifts of the machine hit all rows alike; the row order rotates
by one row per such pass (pass k starts at row k mod rows, see ``rotated``), so running first, or last,
falls on every row in turn (a row keeps its neighbours, except where the list wraps). A run's time covers
the whole ``generate`` call (prefill included) and its speed is the row's own new tokens / seconds: a row
that stops early at EOS (a lossy one may) is divided by fewer tokens, so read tok/s beside the tokens
column. Reported are medians over runs, and the ratio to ``standard`` is the median of per-run ratios
taken side by side (same prompt, same repetition). The JSON keeps every timed run of every row
(``samples``: its position in the pass, seconds, new tokens, tok/s, ratio) and the min / median / max of
tok/s and of the ratio (``spread``), so a run-to-run spread can be checked. Memory is the process RSS,
sampled by a psutil thread every millisecond during the warm-up pass (so sampling never touches the timed
runs): the peak, and the largest rise above the RSS at the start of a run (what decoding itself allocates).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from recyclegpt.bases.hf import HFBackbone
from recyclegpt.bases.llamacpp import FORMATS, LlamaCpp, available, quantized_gguf
from recyclegpt.data import prompt_ids
from recyclegpt.drafters import default_exit_layer
from recyclegpt.generate import DecodeStats, Engine
from recyclegpt.strategies import LOOKUP_DRAFT_LEN, SPEED_WIDTH, make_strategy

HF_ROWS = ("hf-generate", "hf-prompt-lookup")
LLAMA_ROWS = tuple(f"llama-cpp-{fmt}" for fmt in FORMATS)
BASELINE_ROWS = (*HF_ROWS, *LLAMA_ROWS)  # other tools' decoding: no engine counters
MODULE_KINDS = ("alternating", "verified", "adaptive")
ROW_KINDS = ("standard", *MODULE_KINDS, "lookup", "speed", *BASELINE_ROWS)
ROW_ORDER = ("rotated: timed pass k = repetition * prompts + prompt index runs the rows in list order "
             "starting at row k mod rows")
SAMPLE_DIGITS = {"position": 0, "seconds": 6, "new_tokens": 0, "tokens_per_s": 3, "ratio_to_standard": 4}


class BenchError(ValueError):
    """A benchmark request cannot be run as given."""


@dataclass
class Row:
    """One benchmarked way of decoding.

    Attributes:
        name: label in the table (e.g. ``verified-k2``, ``verified-k2w4``, ``adaptive-0.5``).
        kind: one of ``ROW_KINDS``.
        run: token-id prompt -> (new token ids, ``DecodeStats`` or None for other tools' rows).
        draft_len / draft_width / threshold / exit_layer: the strategy's setting, where it has one (speed's
            width is its draft_width).
        module: label of a compared module (``--compare-module``); empty for the main one.
    """

    name: str
    kind: str
    run: Callable[[list[int]], tuple[list[int], DecodeStats | None]] = field(repr=False)
    draft_len: int | None = None
    threshold: float | None = None
    module: str = ""
    draft_width: int | None = None
    exit_layer: int | None = None


def engine_rows(
    engine: Engine, kinds: Sequence[str], max_new_tokens: int, draft_lens: Sequence[int] = (1,),
    thresholds: Sequence[float] = (0.5,), module: str = "", draft_widths: Sequence[int] | None = None,
    exit_layer: int | None = None,
) -> list[Row]:
    """Rows decoded by RecycleGPT's engine; ``verified`` gives one row per (draft length, draft width),
    ``adaptive`` one per threshold, ``speed`` one per width (speculated tokens) at ``exit_layer``; widths None:
    1 for verified, ``SPEED_WIDTH`` for speed.

    A non-empty ``module`` labels the rows of a compared module: their names end in ``@module``.

    Raises:
        ValueError: a draft length or width < 1 or a threshold outside [0, 1].
    """

    def runner(name: str, draft_len: int = 1, threshold: float = 0.5, width: int = 1, exit_layer: int | None = None):
        strategy = make_strategy(name, draft_len, threshold, width, exit_layer=exit_layer)  # validated now

        def run(ids: list[int]) -> tuple[list[int], DecodeStats]:
            g = engine.generate([ids], strategy, max_new_tokens)[0]
            return g.token_ids, g.stats

        return run

    at = f"@{module}" if module else ""
    rows = []
    for kind in kinds:
        if kind == "verified":
            rows += [Row(f"verified-k{k}{f'w{w}' if w > 1 else ''}{at}", kind, runner(kind, draft_len=k, width=w),
                         draft_len=k, module=module, draft_width=w)
                     for w in draft_widths or (1,) for k in draft_lens]
        elif kind == "adaptive":
            rows += [Row(f"adaptive-{t:g}{at}", kind, runner(kind, threshold=t), threshold=t, module=module)
                     for t in thresholds]
        elif kind in ("standard", "alternating"):
            rows.append(Row(f"{kind}{at}", kind, runner(kind), module=module))
        elif kind == "lookup":  # prompt lookup verified by the full model, as transformers' row drafts
            rows.append(Row(f"lookup{at}", kind, runner(kind, draft_len=LOOKUP_DRAFT_LEN),
                            draft_len=LOOKUP_DRAFT_LEN, module=module))
        elif kind == "speed":
            exit_at = default_exit_layer(engine.backbone.config) if exit_layer is None else exit_layer
            rows += [Row(f"speed-e{exit_at}{f'w{w}' if w > 1 else ''}", kind, runner(kind, width=w, exit_layer=exit_at),
                         draft_width=w, exit_layer=exit_at) for w in draft_widths or (SPEED_WIDTH,)]
    return rows


def hf_rows(hf_model: torch.nn.Module, kinds: Sequence[str], max_new_tokens: int, eos_ids: set[int],
            pad_id: int) -> list[Row]:
    """transformers baselines on an ``AutoModelForCausalLM``: greedy ``generate`` and prompt lookup."""
    from transformers import GenerationConfig

    def runner(lookup: int | None):
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids) or None,
            pad_token_id=pad_id, prompt_lookup_num_tokens=lookup,
        )

        def run(ids: list[int]) -> tuple[list[int], None]:
            x = torch.tensor([ids], device=hf_model.device)
            out = hf_model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            return out[0, len(ids) :].tolist(), None

        return run

    rows = []
    if "hf-generate" in kinds:
        rows.append(Row("hf-generate", "hf-generate", runner(None)))
    if "hf-prompt-lookup" in kinds:
        rows.append(Row("hf-prompt-lookup", "hf-prompt-lookup", runner(LOOKUP_DRAFT_LEN)))
    return rows


def llama_rows(model: str, kinds: Sequence[str], max_new_tokens: int, eos_ids: set[int],
               models: ExitStack) -> list[Row]:
    """llama.cpp baselines: greedy decoding of the base's GGUF file in llama.cpp's Q4_0 / Q8_0 formats (made with
    llama.cpp's quantizer, ``bases.llamacpp``), on torch's thread count, fed the same token ids. The models are
    closed when ``models`` closes."""
    rows = []
    for kind in (k for k in LLAMA_ROWS if k in kinds):
        path = quantized_gguf(model, kind.removeprefix("llama-cpp-"), torch.get_num_threads())
        llm = models.enter_context(LlamaCpp(path, threads=torch.get_num_threads()))
        rows.append(Row(kind, kind, lambda ids, llm=llm: (llm.generate(ids, max_new_tokens, eos_ids), None)))
    return rows


def plan_kinds(requested: Sequence[str] | None, has_module: bool, shared: bool = False) -> list[str]:
    """The row kinds to run, ``standard`` first; None means every kind the model allows (the llama.cpp rows
    where llama-cpp-python is installed, ``speed`` on a model whose blocks are ``shared`` across depth).

    Raises:
        BenchError: an unknown kind, or a module strategy without a module.
    """
    if requested is None:
        requested = [k for k in ROW_KINDS if (has_module or k not in MODULE_KINDS) and (shared or k != "speed")
                     and (available() or k not in LLAMA_ROWS)]
    unknown = sorted(set(requested) - set(ROW_KINDS))
    if unknown:
        raise BenchError(f"unknown row kind(s) {unknown}; known: {', '.join(ROW_KINDS)}")
    needing = [k for k in requested if k in MODULE_KINDS]
    if needing and not has_module:
        raise BenchError(f"{', '.join(needing)} need a recyclable module; pass --module PATH")
    return ["standard"] + [k for k in ROW_KINDS if k in requested and k != "standard"]


def benchmark(
    engine: Engine, base, prompts: Sequence[str], strategies: Sequence[str] | None = None, max_new_tokens: int = 128,
    repeats: int = 3, draft_lens: Sequence[int] = (1,), draft_widths: Sequence[int] | None = None,
    thresholds: Sequence[float] = (0.5,), compare: dict[str, torch.nn.Module] | None = None,
    progress: bool = False, exit_layer: int | None = None,
) -> dict:
    """The whole benchmark of ``recyclegpt bench``: every requested row of ``engine`` (and of each compared
    module on the same backbone) and transformers' rows on the same weights, timed by ``run_bench``.

    Args:
        engine: the engine (base and, for the module rows, its module), as ``recyclegpt.load`` returns it.
        base: the ``bases.Base`` it was loaded from (the chat template, and the transformers model's source).
        prompts: prompt texts (the chat template is applied for a chat base).
        strategies: row kinds among ``ROW_KINDS`` (None: every kind the engine allows; see ``plan_kinds``).
        max_new_tokens / repeats / progress: as ``run_bench``; draft_lens, draft_widths, thresholds, exit_layer:
            as ``engine_rows``.
        compare: further modules for the same base by file name: their module rows run in the same interleaved
            passes, named ``ROW@FILE_STEM`` (``PARENT/FILE_STEM`` where two stems clash).

    Returns:
        ``run_bench``'s result.

    Raises:
        BenchError: an unknown row kind, a module row without a module, or ``compare`` without one.
    """
    cfg = engine.backbone.config
    shared = bool(cfg.n_unique_layers and cfg.n_unique_layers < cfg.n_layers)
    kinds = plan_kinds(strategies, engine.module is not None, shared)
    rows = engine_rows(engine, kinds, max_new_tokens, draft_lens, thresholds, draft_widths=draft_widths,
                       exit_layer=exit_layer)
    if compare and engine.module is None:
        raise BenchError("--compare-module needs --module too: it compares modules on one base")
    labels: list[str] = []
    for path, module in (compare or {}).items():
        file = Path(path)
        labels.append(file.stem if file.stem not in labels else f"{file.parent.name}/{file.stem}")
        rows += engine_rows(engine.with_module(module), [k for k in kinds if k in MODULE_KINDS], max_new_tokens,
                            draft_lens, thresholds, module=labels[-1], draft_widths=draft_widths)
    if any(k in HF_ROWS for k in kinds):
        hf_model = hf_model_for(base).to(next(engine.backbone.parameters()).dtype)  # same precision
        rows += hf_rows(hf_model, kinds, max_new_tokens, engine.tokenizer.eos_token_ids, engine.tokenizer.pad_token_id)
    ids = [prompt_ids(engine.tokenizer, p, base.chat) for p in prompts]
    with ExitStack() as models:
        rows += llama_rows(base.name, kinds, max_new_tokens, engine.tokenizer.eos_token_ids, models)
        return run_bench(rows, ids, repeats, progress=progress)


def hf_model_for(base) -> torch.nn.Module:
    """The transformers model holding a loaded base's weights, for the baselines.

    The generic backend already wraps one; for the native backend the source (GGUF file or checkpoint
    directory) is read again with transformers (offline), so both decode the same weights.
    """
    if isinstance(base.backbone, HFBackbone):
        return base.backbone.model
    from recyclegpt.bases import read_hf
    from recyclegpt.bases.registry import resolve

    model, _ = read_hf(resolve(base.name)[1])
    return model.eval()


class PeakRSS:
    """Context manager: the process RSS at entry and its peak until exit, sampled by a thread (bytes)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run_bench(rows: Sequence[Row], prompts: Sequence[list[int]], repeats: int = 3, progress: bool = False) -> dict:
    """Time every row on every prompt (see the module docstring for the rules).

    Args:
        rows: what to run; the first ``standard`` row is the reference (one is required).
        prompts: token-id prompts (chat template already applied where wanted).
        repeats: timed passes after the warm-up.
        progress: show a progress bar on stderr (decodes done, their rate, the pass).

    Returns:
        ``{"prompts", "repeats", "row_order", "threads", "memory", "rows": [...]}``; per row:
        ``tokens_per_s`` (the row's own new tokens / seconds), ``ms_per_token``, ``ratio_to_standard``,
        ``tau`` (RecycleGPT rows: tokens per full call) and ``acceptance_rate`` (verified rows: drafts
        kept / drafted; null elsewhere), ``catch_up_rate`` (speed rows: calls over the first layers alone, at the
        start and after each wrong speculation, per full call; null elsewhere), ``peak_rss_mb``,
        ``rss_increase_mb``, ``new_tokens`` (mean per timed run), ``identical_prompts`` (prompts whose output
        token ids equal ``standard``'s, compared on the warm-up pass: greedy decoding is deterministic),
        ``identical_to_standard`` (all of them), ``spread`` (``{"tokens_per_s", "ratio_to_standard"}``, each ``{"min",
        "median", "max"}`` over the timed runs) and ``samples`` (lists with one entry per timed run, in pass order,
        repetition then prompt: ``position`` in the pass, ``seconds``, ``new_tokens``, ``tokens_per_s``,
        ``ratio_to_standard``; rounded).
    """
    if not prompts:
        raise BenchError("no prompts given")
    if repeats < 1:
        raise BenchError(f"repeats must be >= 1, got {repeats}")
    names = [r.name for r in rows]
    if "standard" not in names:
        raise BenchError("the rows must include 'standard', the reference of every ratio")
    if len(set(names)) != len(names):
        raise BenchError(f"duplicate rows: {names}")
    outputs: dict[str, list[list[int]]] = {r.name: [] for r in rows}
    peak = dict.fromkeys(names, 0)
    rise = dict.fromkeys(names, 0)
    bar = tqdm(total=len(rows) * (1 + len(prompts) * (1 + repeats)), unit="decode", desc="priming",
               disable=not progress, file=sys.stderr)
    # 1. Priming: each row once on the first prompt (weights paged in, lazy allocations made), so
    # that the first row does not carry every one-time cost in its RSS rise.
    for row in rows:
        row.run(list(prompts[0]))
        bar.update()
    # 2. Warm-up pass, excluded from timing; RSS sampled here only.
    bar.set_description("warm-up")
    for ids in prompts:
        for row in rows:
            with PeakRSS() as mem:
                toks, _ = row.run(list(ids))
            outputs[row.name].append(toks)
            peak[row.name] = max(peak[row.name], mem.peak)
            rise[row.name] = max(rise[row.name], mem.peak - mem.start)
            bar.update()
    # 3. Timed passes, interleaved: for each repetition, each prompt, every row once, the row order
    # rotated by one per pass so that each row takes every position in turn.
    samples: dict[str, dict[str, list]] = {
        n: {"position": [], "seconds": [], "new_tokens": [], "tokens_per_s": [], "ratio_to_standard": []}
        for n in names
    }
    stats = {n: DecodeStats() for n in names}
    for rep in range(repeats):
        bar.set_description(f"pass {rep + 1}/{repeats}")
        for i, ids in enumerate(prompts):
            here = {}
            for position, row in enumerate(rotated(rows, rep * len(prompts) + i)):
                t0 = time.perf_counter()
                toks, st = row.run(list(ids))
                seconds = time.perf_counter() - t0
                here[row.name] = (position, seconds, len(toks))
                bar.update()
                if st is not None:
                    _add(stats[row.name], st)
            std_speed = here["standard"][2] / here["standard"][1]
            for n, (position, seconds, new_tokens) in here.items():
                speed = new_tokens / seconds
                for key, value in (("position", position), ("seconds", seconds), ("new_tokens", new_tokens),
                                   ("tokens_per_s", speed), ("ratio_to_standard", speed / std_speed)):
                    samples[n][key].append(value)
    bar.close()
    reference = outputs["standard"]
    table = []
    for row in rows:
        s, runs = stats[row.name], samples[row.name]
        engine_row = row.kind not in BASELINE_ROWS
        table.append({
            "name": row.name,
            "kind": row.kind,
            "draft_len": row.draft_len,
            "draft_width": row.draft_width,
            "exit_layer": row.exit_layer,
            "threshold": row.threshold,
            "module": row.module,
            "tokens_per_s": statistics.median(runs["tokens_per_s"]),
            "ms_per_token": statistics.median(1000 / v for v in runs["tokens_per_s"]),
            "ratio_to_standard": statistics.median(runs["ratio_to_standard"]),
            "tau": s.new_tokens / s.full_calls if engine_row and s.full_calls else None,
            "acceptance_rate": s.accepted / s.drafted if row.kind == "verified" and s.drafted else None,
            # speed: calls over the first layers alone (at the start, and after each wrong speculation) per full call
            "catch_up_rate": s.module_calls / s.full_calls if row.kind == "speed" and s.full_calls else None,
            "peak_rss_mb": peak[row.name] / 2**20,
            "rss_increase_mb": rise[row.name] / 2**20,
            "new_tokens": statistics.mean(runs["new_tokens"]),
            "identical_prompts": sum(a == b for a, b in zip(outputs[row.name], reference, strict=True)),
            "identical_to_standard": outputs[row.name] == reference,
            "spread": {k: _min_median_max(runs[k]) for k in ("tokens_per_s", "ratio_to_standard")},
            "samples": {k: [round(v, SAMPLE_DIGITS[k]) for v in vs] for k, vs in runs.items()},
        })
    return {
        "prompts": len(prompts),
        "repeats": repeats,
        "row_order": ROW_ORDER,
        "threads": torch.get_num_threads(),
        "memory": "process RSS (psutil, sampled every 1 ms during the warm-up pass)",
        "rows": table,
    }


def rotated(rows: Sequence[Row], k: int) -> list[Row]:
    """The rows in list order, started at row ``k`` modulo their number (the order of timed pass ``k``)."""
    k %= len(rows)
    return [*rows[k:], *rows[:k]]


def _min_median_max(values: Sequence[float]) -> dict[str, float]:
    """Smallest, median and largest of per-run values, rounded to 4 decimals."""
    return {k: round(f(values), 4) for k, f in (("min", min), ("median", statistics.median), ("max", max))}


def _add(total: DecodeStats, st: DecodeStats) -> None:
    """Add one single-prompt run's counters to a running total."""
    total.new_tokens += st.new_tokens
    total.full_calls += st.full_calls
    total.module_calls += st.module_calls
    total.drafted += st.drafted
    total.accepted += st.accepted


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table, with a footnote on what tok/s divides."""

    def num(v, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0]))

    w = max(18, *(len(r["name"]) for r in result["rows"]))
    n = result["prompts"]
    head = f"{'row':{w}s} {'tok/s':>8s} {'tokens':>6s} {'ms/tok':>8s} {'x std':>6s} {'tau':>5s} {'accept':>6s} " \
           f"{'RSS MB':>8s} {'+MB':>6s}  identical"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['name']:{w}s} {r['tokens_per_s']:8.1f} {r['new_tokens']:6.1f} {r['ms_per_token']:8.2f} "
            f"{r['ratio_to_standard']:6.2f} {num(r['tau'], '5.2f')} {num(r['acceptance_rate'], '6.2f')} "
            f"{r['peak_rss_mb']:8.0f} {r['rss_increase_mb']:6.0f}  "
            f"{'yes' if r['identical_to_standard'] else 'no, ' + str(r['identical_prompts']) + ' of ' + str(n)}"
        )
    lines.append("tok/s: each row's own new tokens (mean per run: tokens) / seconds, median over runs; "
                 "row order rotated per pass")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """PNG: every row's speed ratio, and the ratio against the adaptive threshold and the draft length.

    Raises:
        BenchError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'recyclegpt[bench]'") from None
    rows = result["rows"]
    sweeps = [(kind, key, label) for kind, key, label in
              (("adaptive", "threshold", "adaptive threshold"), ("verified", "draft_len", "verified draft length"))
              if any(r["kind"] == kind for r in rows)]
    fig = Figure(figsize=(5.5 * (1 + len(sweeps)), max(4.0, 1.5 + 0.35 * len(rows))), layout="constrained")
    axes = fig.subplots(1, 1 + len(sweeps), squeeze=False)[0]
    axes[0].barh([r["name"] for r in rows][::-1], [r["ratio_to_standard"] for r in rows][::-1])
    axes[0].axvline(1.0, color="gray", lw=0.8)
    axes[0].set_xlabel("speed / standard (median of per-run ratios)")
    for ax, (kind, key, label) in zip(axes[1:], sweeps, strict=True):
        for module, width in dict.fromkeys((r["module"], r.get("draft_width")) for r in rows if r["kind"] == kind):
            pts = sorted((r[key], r["ratio_to_standard"]) for r in rows if r["kind"] == kind and r["module"] == module
                         and r.get("draft_width") == width)
            series = kind + (f" width {width}" if width and width > 1 else "") + (f"@{module}" if module else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
        for i, other in enumerate(rows):
            if other["kind"] in ("alternating", "lookup", *BASELINE_ROWS):
                ax.axhline(other["ratio_to_standard"], ls="--", lw=0.8, color=f"C{i}", label=other["name"])
        ax.axhline(1.0, color="gray", lw=0.8, label="standard")
        ax.set_xticks(sorted({r[key] for r in rows if r["kind"] == kind}))
        ax.set_xlabel(label)
        ax.set_ylabel("speed / standard")
        ax.legend(fontsize=8)
    setting = [f"{k}: {result[k]}" for k in ("model", "dtype") if k in result]
    setting += [word for k, word in (("compile", "compiled"), ("prepack", "prepacked")) if result.get(k)]
    setting += [f"quant: {result['quant']}"] if result.get("quant", "none") != "none" else []
    setting += [f"{k}: {result[k]}" for k in ("prompts", "repeats", "threads")]
    fig.suptitle(", ".join(setting))
    fig.savefig(path, dpi=120)
