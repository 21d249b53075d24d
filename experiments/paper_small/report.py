"""Collect the paper_small runs into one summary: results/summary.json, three plots and Markdown tables.

    python experiments/paper_small/report.py --runs runs/paper_small --results experiments/paper_small/results

Reads each run's ``log.jsonl`` and ``model.safetensors`` and the JSON written by ``run.sh eval``
(``eval_*.json``, ``lm_eval_*.json``, ``bench_*.json``); prints the tables pasted into README.md.
With ``--update NAME ...`` only those runs are read again and every other run keeps its record in the
existing summary.json (runs made on another machine, whose directories are gone).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors import safe_open

from recyclegpt.evaluate import paired_summary

MAIN, ABLATION = ("plain", "recycle"), ("depth1", "depth2", "depth4")
# recycle weight 0 and 0.1 on the main pair's schedule, 0.1 with a 1-layer module, and the plain GPT and
# the 1-layer lambda 0.1 run with seeds 1 and 2: how far runs differ by seed alone (run.sh sweep); then the
# 1-layer lambda 0.1 run alone with seeds 3-5, for the task bar (run.sh seeds)
SEEDS = ("w0.1d1s3", "w0.1d1s4", "w0.1d1s5")
SWEEP = ("w0", "w0.1", "w0.1d1", "w0s1", "w0.1d1s1", "w0s2", "w0.1d1s2", *SEEDS)
# the 1-layer lambda 0.1 run with seeds 0-5: runs that differ only by seed, whose standard-vs-alternating
# task flips add up into one paired test over the first 2, 3, ... seeds
D1_SEEDS = ("w0.1d1", "w0.1d1s1", "w0.1d1s2", *SEEDS)
POOLED = {"lambda 0.1, 1 layer, seeds 0 + 1": D1_SEEDS[:2], "lambda 0.1, 1 layer, seeds 0 + 1 + 2": D1_SEEDS[:3],
          "lambda 0.1, 1 layer, seeds 0-3": D1_SEEDS[:4], "lambda 0.1, 1 layer, seeds 0-4": D1_SEEDS[:5],
          "lambda 0.1, 1 layer, seeds 0-5": D1_SEEDS}
BAR = 0.03  # issue #8: the main head's validation perplexity within 3 % of the plain GPT's
TASKS = (("recycle_cloze_austen", "acc"), ("recycle_next_sentence_austen", "acc_norm"),
         ("recycle_next_verse_kjv", "acc_norm"), ("recycle_word_order_austen", "acc"))
# bench row names -> summary key prefixes (verified: draft length 1, width 1 or 4)
BENCH_ROWS = {"alternating": "alternating", "verified-k1": "verified", "verified-k1w4": "verified_w4"}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def _checkpoint(run: Path) -> tuple[int, int, dict]:
    """(backbone, module) parameter counts and the recycle config of a run's ``model.safetensors``.

    The module shares the embedding and head, so owns neither.
    """
    counts = {"backbone": 0, "module": 0}
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            part = key.split(".")[0]
            if part in counts and not key.endswith("draft_vocab"):
                counts[part] += math.prod(f.get_slice(key).get_shape())
        recycle = json.loads(f.metadata()["recycle_config"])
    return counts["backbone"], counts["module"], recycle


def _bench(path: Path) -> dict[str, float]:
    result = _json(path)
    if result is None:
        return {}
    rows = {r["name"]: r for r in result["rows"]}
    out = {"standard_tok_s": rows["standard"]["tokens_per_s"]}
    for name, key in BENCH_ROWS.items():
        if name in rows:
            out[f"{key}_ratio"] = rows[name]["ratio_to_standard"]
            out[f"{key}_tau"] = rows[name]["tau"]
            if key != "alternating":
                out[f"{key}_acceptance"] = rows[name]["acceptance_rate"]
                out[f"{key}_identical"] = rows[name]["identical_to_standard"]
    return out


def summarize(runs: Path, results: Path, names: tuple[str, ...], previous: dict[str, dict]) -> dict[str, dict]:
    """One record per run: size, training, held-out evaluation, lm-eval tasks, decode speed.

    The runs in ``names`` are read again from ``runs`` and ``results``; every other run keeps its
    record in ``previous``.
    """
    summary = {}
    for name in MAIN + ABLATION + SWEEP:
        run = runs / name
        if name not in names or not (run / "log.jsonl").is_file():
            if name in previous:
                summary[name] = previous[name]
            continue
        log = _log(run)
        vals = [r for r in log if "val_main_loss" in r]
        backbone, module, recycle = _checkpoint(run)
        config = json.loads((run / "train_config.json").read_text())
        record = {
            "backbone_params": backbone, "module_params": module, "module_share": module / backbone,
            "module_layers": recycle["n_layers"], "recycle_weight": recycle["recycle_weight"],
            "train_mtokens": log[-1]["tokens"] / 1e6, "train_hours": log[-1]["tokens"] / log[-1]["tokens_per_s"] / 3600,
            "steps": config["steps"], "seed": config["seed"],
            "val_main_ppl": math.exp(vals[-1]["val_main_loss"]),
            "val_recycle_acc": vals[-1].get("val_recycle_acc"),
            # (training tokens, validation loss of the main head) at every evaluation
            "val_curve": [[r["tokens"], r["val_main_loss"]] for r in vals],
        }
        ev = _json(results / f"eval_{name}.json")
        if ev:
            t = ev["text"]
            record.update(heldout_ppl=t["ppl_base"], heldout_ppl_alternating=t["ppl_alternating"],
                          module_top1_acc=t["module_top1_acc"], base_top1_acc=t["base_top1_acc"],
                          agreement=t["agreement"])
        lm = _json(results / f"lm_eval_{name}.json")
        if lm:
            for scoring, tasks in lm["results"].items():
                for task, metric in TASKS:
                    if task in tasks:  # the word-order task came later than some runs' lm-eval
                        record[f"{task}_{scoring}"] = tasks[task][f"{metric},none"]
            for task, metric in TASKS:  # item by item, standard against alternating (lm-eval with a module)
                if task in lm.get("paired", {}):
                    record[f"{task}_paired"] = lm["paired"][task][metric]
        every = _json(results / f"lm_eval_{name}_word_order_all.json")  # run.sh seeds: all 851 word-order pairs
        if every:
            record["word_order_all_paired"] = every["paired"]["recycle_word_order_austen"]["acc"]
        # run.sh eval: full and draft vocabulary; run.sh sweep: draft vocabulary with --prepack
        for module in ("module", "module_dv8192", "prepack"):
            for key, value in _bench(results / f"bench_{name}_{module}.json").items():
                record[f"{key}_{module}"] = value
        summary[name] = record
    return summary


def _fmt(x, spec=".3f", unit="") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def _ratios_of(d: dict, module: str) -> str:
    return " / ".join(_fmt(d.get(f"{kind}_ratio_{module}"), ".2f", "x") for kind in ("alternating", "verified"))


def _ratios(d: dict, kind: str) -> str:
    return " / ".join(_fmt(d.get(f"{kind}_ratio_{m}"), ".2f", "x") for m in ("module", "module_dv8192"))


def tables(s: dict[str, dict]) -> str:
    """The Markdown tables of README.md."""
    lines = ["| | plain GPT (lambda 0) | RecycleGPT (lambda 1) |", "|---|---|---|"]
    p, r = s.get("plain", {}), s.get("recycle", {})

    def row(label, key, spec=".3f"):
        lines.append(f"| {label} | {_fmt(p.get(key), spec)} | {_fmt(r.get(key), spec)} |")

    lines.append(f"| parameters: backbone / module (share) | {p.get('backbone_params', 0) / 1e6:.2f} M / - | "
                 f"{r.get('backbone_params', 0) / 1e6:.2f} M / {r.get('module_params', 0) / 1e6:.2f} M "
                 f"({r.get('module_share', 0):.1%}) |")
    row("training tokens (M)", "train_mtokens", ".2f")
    row("training wall time (h, 2 CPU threads)", "train_hours", ".2f")
    row("validation perplexity, main head", "val_main_ppl", ".2f")
    row("held-out perplexity (Austen/KJV tails), standard", "heldout_ppl", ".2f")
    row("held-out perplexity, alternating scoring", "heldout_ppl_alternating", ".2f")
    row("held-out top-1 accuracy, main head (next token)", "base_top1_acc")
    row("held-out top-1 accuracy, module (token after next)", "module_top1_acc")
    for task, metric in TASKS:
        if f"{task}_standard" not in p | r:  # a task added after this pair's models were gone
            continue
        lines.append(f"| {task} {metric}, standard / alternating | {_fmt(p.get(f'{task}_standard'))} / - | "
                     f"{_fmt(r.get(f'{task}_standard'))} / {_fmt(r.get(f'{task}_alternating'))} |")
    for module, label in (("module", "full vocabulary"), ("module_dv8192", "draft vocabulary 8192")):
        lines.append(f"| decode speedup over standard, alternating / verified ({label}) | - | "
                     f"{_ratios_of(r, module)} |")
    row("verified: acceptance of the module's drafts", "verified_acceptance_module", ".2f")
    lines += ["", "| module layers | module params | share | val recycle acc | held-out module top-1 | "
              "alternating ppl | alternating (full / draft vocab) | verified (full / draft vocab) | "
              "verified acceptance |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in (s[n] for n in ABLATION if n in s):
        lines.append(
            f"| {d['module_layers']} | {d['module_params'] / 1e6:.2f} M | {d['module_share']:.1%} | "
            f"{_fmt(d.get('val_recycle_acc'))} | {_fmt(d.get('module_top1_acc'))} | "
            f"{_fmt(d.get('heldout_ppl_alternating'), '.2f')} | "
            f"{_ratios(d, 'alternating')} | {_ratios(d, 'verified')} | "
            f"{_fmt(d.get('verified_acceptance_module'), '.2f')} |"
        )
    lines += ["", "| recycle weight | module layers | seed | validation perplexity, main head | vs plain GPT | "
              "held-out ppl, standard / alternating | held-out module top-1 | agreement | tasks, standard / "
              "alternating (cloze; next sentence; next verse; word order) | decode speedup, alternating / verified / "
              "verified width 4 | training wall time (h) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    # each run against the plain GPT trained on the same machine with the same seed (the seed also draws
    # the validation batches): the sweep's lambda 0 of that seed, or the main pair's
    rows = [(f"{s[n]['recycle_weight']:g}", s[n], _plain_of(s, s[n])) for n in SWEEP if n in s]
    if "recycle" in s:
        rows.append(("1 (main pair, above)", s["recycle"], s.get("plain")))
    for label, d, ref in rows:
        # "n/a": a run with no plain GPT of its seed (run.sh seeds)
        vs = "-" if d.get("recycle_weight") == 0 else "n/a"
        if ref is not None:
            vs = f"{d['val_main_ppl'] / ref['val_main_ppl'] - 1:+.1%}"
        lines.append(
            f"| {label} | {d['module_layers']} | {d.get('seed', 0)} | {d['val_main_ppl']:.2f} | {vs} | "
            f"{_fmt(d.get('heldout_ppl'), '.2f')} / {_fmt(d.get('heldout_ppl_alternating'), '.2f')} | "
            f"{_fmt(d.get('module_top1_acc'))} | {_fmt(d.get('agreement'))} | "
            + "; ".join(f"{_fmt(d.get(f'{task}_standard'))} / {_fmt(d.get(f'{task}_alternating'))}"
                        for task, _ in TASKS)
            + " | " + " / ".join(_fmt(d.get(f"{k}_ratio_prepack"), ".2f", "x") for k in BENCH_ROWS.values())
            + f" | {d['train_hours']:.2f} |"
        )
    lines += ["", "| run | recycle weight | module layers | seed | "
              + " | ".join(f"{task} {metric}: standard -> alternating (right->wrong / wrong->right, McNemar p)"
                           for task, metric in TASKS) + " |", "|---|---|---|---|" + "---|" * len(TASKS)]
    for n in (*SWEEP, "recycle"):
        d = s.get(n, {})
        if any(f"{task}_paired" in d for task, _ in TASKS):
            lines.append(f"| {n} | {d['recycle_weight']:g} | {d['module_layers']} | {d.get('seed', 0)} | "
                         + " | ".join(_paired(d.get(f"{task}_paired")) for task, _ in TASKS) + " |")
    for label, names in POOLED.items():
        if all(f"{TASKS[0][0]}_paired" in s.get(n, {}) for n in names):
            lines.append(f"| {label} (pooled) | | | | "
                         + " | ".join(_paired(_pool([s[n][f"{task}_paired"] for n in names])) for task, _ in TASKS)
                         + " |")
    every = [n for n in SEEDS if "word_order_all_paired" in s.get(n, {})]
    if every:
        lines += ["", "| run | seed | recycle_word_order_austen acc on all held-out pairs: standard -> alternating "
                  "(right->wrong / wrong->right, McNemar p) |", "|---|---|---|"]
        lines += [f"| {n} | {s[n]['seed']} | {_paired(s[n]['word_order_all_paired'])} |" for n in every]
        if len(every) > 1:
            lines.append(f"| {' + '.join(every)} (pooled) | | "
                         f"{_paired(_pool([s[n]['word_order_all_paired'] for n in every]))} |")
        # every pair each 1-layer lambda 0.1 seed was scored on: the task's 300, or all 851 where there are
        task = "recycle_word_order_austen_paired"
        seeds = [n for n in D1_SEEDS if task in s.get(n, {})]
        flips = [s[n].get("word_order_all_paired", s[n][task]) for n in seeds]
        lines.append(f"| {' + '.join(seeds)}, every pair scored ({' + '.join(str(f['items']) for f in flips)}; "
                     f"pooled) | | {_paired(_pool(flips))} |")
    return "\n".join(lines)


def _plain_of(s: dict[str, dict], d: dict) -> dict | None:
    """The sweep's plain GPT (lambda 0) with the seed of run ``d``, or None for that run itself."""
    for n in SWEEP:
        ref = s.get(n)
        if ref is not None and ref is not d and ref["recycle_weight"] == 0 and ref.get("seed", 0) == d.get("seed", 0):
            return ref
    return None


def _pool(flips: list[dict]) -> dict:
    """Paired comparisons of disjoint item sets (one per run) as one: every count adds up."""
    right = [sum(round(f[k] * f["items"]) for f in flips) for k in ("standard", "alternating")]
    return paired_summary(sum(f["items"] for f in flips), *right, sum(f["right_to_wrong"] for f in flips),
                          sum(f["wrong_to_right"] for f in flips))


def _paired(f: dict | None) -> str:
    if f is None:
        return "n/a"
    return (f"{f['standard']:.3f} -> {f['alternating']:.3f} ({f['diff_points']:+.1f} points; "
            f"{f['right_to_wrong']} / {f['wrong_to_right']}, p {f['mcnemar_p']:.2f})")


def plot_sweep(s: dict[str, dict], results: Path) -> None:
    """recycle_weight.png: the main head's validation loss of each sweep run, and its perplexity gap to lambda 0."""
    from matplotlib.figure import Figure

    runs = [s[n] for n in SWEEP if n in s]
    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_gap = fig.subplots(1, 2)
    for i, d in enumerate(runs):
        tokens = [t / 1e6 for t, _ in d["val_curve"]]
        name = f"lambda {d['recycle_weight']:g}"
        if d["recycle_weight"]:
            name += f", {d['module_layers']}-layer module"
        name += f", seed {d.get('seed', 0)}"
        ax_loss.plot(tokens, [loss for _, loss in d["val_curve"]], marker="o", color=f"C{i}", label=name)
        ref = _plain_of(s, d)  # the same seed's plain GPT, scored on the same validation batches
        if d["recycle_weight"] and ref is not None:
            base = dict(ref["val_curve"])
            ax_gap.plot(tokens, [100 * (math.exp(loss - base[t]) - 1) for t, loss in d["val_curve"]], marker="o",
                        color=f"C{i}", label=name)
    ax_gap.axhline(100 * BAR, color="tab:red", linestyle="--", label=f"bar (+{100 * BAR:g} %)")
    ax_gap.axhline(0, color="gray", linewidth=0.8)
    ax_loss.set(xlabel="training tokens (M)", ylabel="validation loss, main head", title="Validation loss", ylim=(3, 8))
    ax_gap.set(xlabel="training tokens (M)", ylabel="validation perplexity increase (%)",
               title="Cost of the recycle loss: vs lambda 0 of the same seed")
    ax_gap.set_ylim(bottom=ax_gap.get_ylim()[0] - 2.5)  # room for the legend below the curves
    for ax, where in ((ax_loss, "best"), (ax_gap, "lower left")):
        ax.grid(alpha=0.3)
        ax.legend(loc=where, fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "recycle_weight.png", dpi=120)


def _plot_loss_curves(runs: Path, results: Path) -> None:
    """loss_curves.png: training and validation loss of the main pair over training tokens."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_train, ax_val = fig.subplots(1, 2)
    for name, color in (("plain", "tab:blue"), ("recycle", "tab:orange")):
        log = _log(runs / name)
        tokens = [r["tokens"] / 1e6 for r in log]
        window = 10  # running mean over 10 steps; single steps are noisy at 4k tokens each
        smooth = [sum(r["main_loss"] for r in log[max(0, i - window + 1): i + 1]) / min(i + 1, window)
                  for i in range(len(log))]
        ax_train.plot(tokens, smooth, color=color, label=f"{name}: main head")
        if name == "recycle":
            rec = [sum(r["recycle_loss"] for r in log[max(0, i - window + 1): i + 1]) / min(i + 1, window)
                   for i in range(len(log))]
            ax_train.plot(tokens, rec, color=color, linestyle="--", label="recycle: module (token after next)")
        val = [r for r in log if "val_main_loss" in r]
        ax_val.plot([r["tokens"] / 1e6 for r in val], [r["val_main_loss"] for r in val], marker="o", color=color,
                    label=f"{name}: main head")
    ax_train.set(xlabel="training tokens (M)", ylabel="training loss (running mean of 10 steps)",
                 title="Training loss", ylim=(2.5, 9))
    ax_val.set(xlabel="training tokens (M)", ylabel="validation loss, main head", title="Validation loss",
               ylim=(3, 8))
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "loss_curves.png", dpi=120)


def plot(runs: Path, s: dict[str, dict], results: Path) -> None:
    """loss_curves.png (the paper's Figure 3; only when both main runs' logs are here) and depth_ablation.png."""
    from matplotlib.figure import Figure

    if all((runs / name / "log.jsonl").is_file() for name in MAIN):
        _plot_loss_curves(runs, results)
    depths = [s[n] for n in ABLATION if n in s]
    if not depths:
        return
    fig = Figure(figsize=(11, 4.2))
    ax_speed, ax_acc = fig.subplots(1, 2)
    layers = [d["module_layers"] for d in depths]
    for key, label, style in (("alternating_ratio_module", "alternating, full vocabulary", "o-"),
                              ("alternating_ratio_module_dv8192", "alternating, draft vocabulary", "o--"),
                              ("verified_ratio_module", "verified, full vocabulary", "s-"),
                              ("verified_ratio_module_dv8192", "verified, draft vocabulary", "s--")):
        if all(key in d for d in depths):
            ax_speed.plot(layers, [d[key] for d in depths], style, label=label)
    ax_speed.axhline(1.0, color="gray", linewidth=0.8)
    ax_speed.set(xlabel="module layers", ylabel="decode speed / standard", title="Speedup (CPU, batch 1)",
                 xticks=layers)
    ax_acc.plot(layers, [d.get("module_top1_acc") for d in depths], "o-", label="module top-1 (held-out)")
    ax_acc.plot(layers, [d.get("agreement") for d in depths], "s-", label="agreement with main head's greedy")
    ax_acc.set(xlabel="module layers", ylabel="share", title="Module accuracy", xticks=layers)
    for ax in (ax_speed, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "depth_ablation.png", dpi=120)


def main() -> None:
    """Write summary.json and the plots, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/paper_small", help="directory of the runs (default runs/paper_small)")
    ap.add_argument("--results", default="experiments/paper_small/results", help="where the JSON results are")
    ap.add_argument("--update", nargs="+", choices=MAIN + ABLATION + SWEEP, metavar="NAME",
                    help="read only these runs again; the others keep their records in summary.json "
                         f"(default: every run; names: {' '.join(MAIN + ABLATION + SWEEP)})")
    args = ap.parse_args()
    runs, results = Path(args.runs), Path(args.results)
    names = tuple(args.update or MAIN + ABLATION + SWEEP)
    summary = summarize(runs, results, names, _json(results / "summary.json") or {})
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if set(names) & set(MAIN + ABLATION):
        plot(runs, summary, results)
    if set(names) & set(SWEEP) and SWEEP[0] in summary:
        plot_sweep(summary, results)
    print(tables(summary))


if __name__ == "__main__":
    main()
