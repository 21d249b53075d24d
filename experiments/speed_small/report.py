"""SPEED at small scale (issue #35): measure the runs of run.sh side by side and print the tables of README.md.

``--measure`` (run.sh's eval stage) loads the four runs, measures each early exit's agreement with its model on the
held-out text (top-1 and top-3: how often ``--strategy speed`` at width 1 and 3 keeps its speculation there),
checks that speed decoding equals standard decoding on every prompt, and times every model's decoding in one
interleaved ``recyclegpt.bench.run_bench`` (rows of four models side by side, the row order rotated per pass),
writing results/agreement.json, results/exact.json and results/bench.json. Without it, the report reads those
and the runs' eval_*.json and log.jsonl, writes results/summary.json and results/speed.png (decode speed, and
the validation losses of the training runs), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RUNS = {  # name -> (what it is, the early exit speed reads, the recyclable module's rows)
    "plain": ("plain GPT, 6 layers (early-exit loss at layer 3)", 3, False),
    "shared_ee": ("shared, 12 logical layers over 6 blocks (early-exit loss at layer 6)", 6, False),
    "shared": ("shared, 12 logical layers over 6 blocks (no early-exit loss)", 6, False),
    "recycle": ("RecycleGPT small (lambda 0.1, 1-layer module)", None, True),
}
WIDTHS = (1, 3)  # speculation widths measured (3: strategies.SPEED_WIDTH)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def measure(runs: Path, results: Path, prompts_file: Path, repeats: int, max_new_tokens: int, n_text: int) -> None:
    """Agreement, exactness and the interleaved bench (the slow part: about 15 minutes on 2 cores)."""
    import torch

    from recyclegpt import load
    from recyclegpt.bench import engine_rows, run_bench
    from recyclegpt.data import read_prompts
    from recyclegpt.evaluate import early_exit_agreement
    from recyclegpt.hardware import measured_on
    from recyclegpt.model import count_parameters
    from recyclegpt.strategies import make_strategy

    prompts = read_prompts(prompts_file)
    engines = {name: load(str(runs / name), str(runs / name / "module.safetensors") if module else None)
               for name, (_, _, module) in RUNS.items()}
    text = (runs / "heldout.txt").read_text()
    agreement, exact, rows, models = {}, {}, [], {}
    for name, (_, exit_layer, module) in RUNS.items():
        engine = engines[name]
        cfg = engine.backbone.config
        models[name] = {"n_layers": cfg.n_layers, "n_unique_layers": cfg.n_unique_layers,
                        "parameters": count_parameters(engine.backbone)}
        ids = [engine.tokenizer.encode(p) for p in prompts]
        if exit_layer:
            tokens = engine.tokenizer.encode(text)[:n_text]
            agreement[name] = {f"top{k}": early_exit_agreement(engine.backbone, tokens, exit_layer, top=k)
                               for k in WIDTHS} | {"layer": exit_layer, "tokens": len(tokens)}
            standard = [g.token_ids for g in (engine.generate([p], max_new_tokens=max_new_tokens)[0] for p in ids)]
            exact[name] = {f"w{w}": sum(engine.generate([p], make_strategy("speed", width=w, exit_layer=exit_layer),
                                                        max_new_tokens)[0].token_ids == s
                                        for p, s in zip(ids, standard, strict=True)) for w in WIDTHS}
            exact[name]["prompts"] = len(ids)
            print(f"{name}: agreement {agreement[name]}, speed equal to standard {exact[name]}", file=sys.stderr)
        kinds = ["standard", "alternating", "verified"] if module else ["standard", "speed"]
        for row in engine_rows(engine, kinds, max_new_tokens, draft_widths=(1,) if module else WIDTHS,
                               exit_layer=exit_layer):
            row.module = name
            if rows:  # the first row, plain's standard, keeps the name run_bench takes as the reference
                row.name = f"{row.name}@{name}"
            rows.append(row)
    torch.manual_seed(0)
    ids = [engines["plain"].tokenizer.encode(p) for p in prompts]  # one tokenizer (SmolLM2's) for all four
    bench = run_bench(rows, ids, repeats, progress=True)
    bench["rows"][0]["name"] = "standard@plain"
    bench |= measured_on()
    for name, data in (("agreement", agreement), ("exact", exact), ("bench", bench), ("models", models)):
        (results / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def _ratio(a: dict, b: dict) -> float:
    """Median of per-run ratios of two rows' tok/s, run by run (same prompt, same pass)."""
    return statistics.median(x / y for x, y in zip(a["samples"]["tokens_per_s"], b["samples"]["tokens_per_s"],
                                                     strict=True))


def _block_reads(name: str, kind: str, catch_up: float | None, cfg: dict) -> float:
    """The unique blocks' weights read per generated token, in multiples of all of them (standard on the shared
    model reads each block twice per token; speed reads them once per call plus once more per catch-up)."""
    L, S = cfg["n_layers"], cfg["n_unique_layers"] or cfg["n_layers"]
    if kind != "speed":
        return L / S
    K = RUNS[name][1]
    per_call = len({i % S for i in range(L)}) / S if K % S == 0 else L / S  # merged ticks read a block once
    return per_call + (catch_up or 0.0) * len({i % S for i in range(K)}) / S


def summarize(runs: Path, results: Path) -> dict:
    bench, agreement, exact, models = (_json(results / f"{n}.json") for n in ("bench", "agreement", "exact", "models"))
    rows = {r["name"]: r for r in bench["rows"]}
    out = {"cpu": bench.get("cpu"), "threads": bench["threads"], "repeats": bench["repeats"],
           "prompts": bench["prompts"], "models": {}}
    for name, (what, _, _) in RUNS.items():
        cfg = models[name]
        ev = _json(results / f"eval_{name}.json") or {}
        log = [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        last = [r for r in log if "val_main_loss" in r][-1]
        own = rows[f"standard@{name}"]
        model = {"what": what, "logical_layers": cfg["n_layers"],
                 "unique_blocks": cfg["n_unique_layers"] or cfg["n_layers"], "parameters": cfg["parameters"],
                 "heldout_ppl": (ev.get("text") or {}).get("ppl_base"), "val_main_loss": last["val_main_loss"],
                 "val_early_acc": last.get("val_early_acc"), "agreement": agreement.get(name),
                 "speed_equal_to_standard": exact.get(name), "rows": {}}
        for row in (r for r in bench["rows"] if r["module"] == name):
            model["rows"][row["name"].split("@")[0]] = {
                "tokens_per_s": row["tokens_per_s"], "x_own_standard": _ratio(row, own),
                "x_plain_standard": _ratio(row, rows["standard@plain"]), "catch_up_rate": row["catch_up_rate"],
                "block_reads_per_token": _block_reads(name, row["kind"], row["catch_up_rate"], cfg)}
        out["models"][name] = model
    (results / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def tables(s: dict) -> str:
    lines = ["| model | logical layers / unique blocks | held-out ppl | early exit | agreement top-1 / top-3 | "
             "speed == standard (w1, w3) |", "|---|---|---|---|---|---|"]
    for name, m in s["models"].items():
        a, e = m["agreement"], m["speed_equal_to_standard"]
        equal = ", ".join(f"{e[f'w{w}']}/{e['prompts']}" for w in WIDTHS) if e else "-"
        lines.append(f"| {name}: {m['what']} | {m['logical_layers']} / {m['unique_blocks']} | "
                     f"{_f(m['heldout_ppl'], '.1f')} | {a['layer'] if a else '-'} | "
                     f"{' / '.join(_f(a and a[f'top{w}'], '.3f') for w in WIDTHS)} | "
                     f"{equal} |")
    lines += ["", "| model | row | tok/s | x its standard | x plain standard | catch-ups per call | "
              "block weights read per token |", "|---|---|---|---|---|---|---|"]
    for name, m in s["models"].items():
        for row, r in m["rows"].items():
            lines.append(f"| {name} | {row} | {r['tokens_per_s']:.1f} | {r['x_own_standard']:.2f} | "
                         f"{r['x_plain_standard']:.2f} | {_f(r['catch_up_rate'])} | {r['block_reads_per_token']:.2f} |")
    return "\n".join(lines)


def plot(runs: Path, s: dict, results: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, loss = fig.subplots(1, 2)
    labels, values, colors = [], [], []
    for i, (name, m) in enumerate(s["models"].items()):
        for row, r in m["rows"].items():
            labels.append(f"{name}: {row}")
            values.append(r["tokens_per_s"])
            colors.append(f"C{i}")
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.set_xlabel(f"tokens/s (median, {s['threads']} threads, greedy; {(s['cpu'] or {}).get('generation', '')})")
    ax.set_title("decode speed, one interleaved run")
    for i, name in enumerate(s["models"]):
        log = [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        pts = [(r["tokens"] / 1e6, r["val_main_loss"]) for r in log if "val_main_loss" in r]
        loss.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=name)
        early = [(r["tokens"] / 1e6, r["val_early_ce"]) for r in log if "val_early_ce" in r]
        if early:
            loss.plot([p[0] for p in early], [p[1] for p in early], ls="--", color=f"C{i}", label=f"{name}, early exit")
    loss.set_xlabel("training tokens (M)")
    loss.set_ylabel("validation cross-entropy")
    loss.legend()
    fig.savefig(results / "speed.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/speed_small", help="directory of the runs (default runs/speed_small)")
    ap.add_argument("--results", default="experiments/speed_small/results", help="where the JSON results go")
    ap.add_argument("--measure", action="store_true", help="measure agreement, exactness and speed first")
    ap.add_argument("--prompts", default="runs/speed_small/prompts.jsonl", help="decode prompts (run.sh writes them)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--text-tokens", type=int, default=16384, help="held-out tokens agreement reads (default 16384)")
    args = ap.parse_args()
    runs, results = Path(args.runs), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.measure:
        measure(runs, results, Path(args.prompts), args.repeats, args.max_new_tokens, args.text_tokens)
    s = summarize(runs, results)
    plot(runs, s, results)
    print(tables(s))


if __name__ == "__main__":
    main()
