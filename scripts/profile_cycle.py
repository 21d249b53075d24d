"""Where a decode cycle's time goes: the full-model calls, the module steps, the module's draft head and the
copy mixture, timed inside the engine's own decode loop (no profiler overhead), for two strategies side by side.

    python scripts/profile_cycle.py --prepack --threads 2              # standard against alternating
    python scripts/profile_cycle.py --prepack --strategies standard verified --draft-len 2 --draft-width 4
    python scripts/profile_cycle.py --quant int4 --strategies standard alternating verified

Each strategy runs the same prompts (chat template applied, one at a time, batch 1) after one warm-up pass,
then ``--repeats`` interleaved passes; the table gives each pass's milliseconds per emitted token, split by
part, and the ratio of every strategy's time per token to the first's (medians over passes). "rest" is the
rest of the engine's own prefill + decode time (sampling, acceptance, cache bookkeeping); "all" is the wall
clock around each whole ``generate`` call, measured apart from both, so the parts and rest fall short of it
only by what the engine's timing leaves out (cache allocation, decoding the text). Timings on a shared
machine drift: compare strategies within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from recyclegpt import load
from recyclegpt.data import prompt_ids, read_prompts
from recyclegpt.hardware import setup_cpu

PARTS = {"full calls": ("backbone", "forward"), "module": ("module", "forward"),
         "draft head": ("module", "draft_logits"), "copy mixture": ("module", "copy_logits")}


def timed(obj, name: str, spent: dict, key: str) -> None:
    """Wrap ``obj.name`` (an instance attribute shadowing the method) so that its wall time adds to spent[key]."""
    inner = getattr(obj, name)

    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t

    setattr(obj, name, call)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="default", help="module file, or 'default' (the shipped one)")
    p.add_argument("--prompts", default="benchmarks/prompts.jsonl", help="prompt file (default: the benchmark's)")
    p.add_argument("--n", type=int, default=4, help="prompts to run, from the file's start (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument("--strategies", nargs="+", default=["standard", "alternating"],
                   help="strategies to time; ratios are to the first (default: standard alternating)")
    p.add_argument("--draft-len", type=int, default=1, help="verified / adaptive: drafts per full call (default 1)")
    p.add_argument("--draft-width", type=int, default=1, help="verified: candidates for the first slot (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes after the warm-up (default 2)")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="oneDNN with packed weights (as --prepack elsewhere; default: this CPU's choice)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantized products (as --quant elsewhere; default none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        p.error("--n and --repeats must be at least 1")
    setup_cpu(args.threads)
    engine, base = load(module=args.module, prepack=args.prepack, quant=args.quant, with_base=True)
    ids = [prompt_ids(engine.tokenizer, q, base.chat) for q in read_prompts(args.prompts)[: args.n]]
    spent = dict.fromkeys(PARTS, 0.0)
    for key, (owner, name) in PARTS.items():
        timed(getattr(engine, owner), name, spent, key)

    def one_pass(strategy: str) -> dict[str, float]:
        """ms per emitted token of each part, of the rest of the engine's own timing, and in all (wall clock)."""
        for key in spent:
            spent[key] = 0.0
        timed_s = wall_s = tokens = 0
        for q in ids:
            t = time.perf_counter()
            g = engine.generate([q], strategy, max_new_tokens=args.max_new_tokens, draft_len=args.draft_len,
                                draft_width=args.draft_width)[0]
            wall_s += time.perf_counter() - t
            timed_s += g.stats.prefill_s + g.stats.decode_s
            tokens += g.stats.new_tokens
        row = {key: v * 1000 / tokens for key, v in spent.items()}
        row["rest"] = timed_s * 1000 / tokens - sum(row.values())
        row["all"] = wall_s * 1000 / tokens
        return row

    for s in args.strategies:
        one_pass(s)  # warm-up
    passes = {s: [] for s in args.strategies}
    for _ in range(args.repeats):
        for s in args.strategies:
            passes[s].append(one_pass(s))
    cols = [*PARTS, "rest", "all"]
    print(f"ms per emitted token (median of {args.repeats} passes; {len(ids)} prompts x {args.max_new_tokens} tokens)")
    print(f"{'strategy':14s}" + "".join(f"{c:>14s}" for c in cols) + f"{'x first':>10s}")
    first = statistics.median(r["all"] for r in passes[args.strategies[0]])
    for s, rows in passes.items():
        med = {c: statistics.median(r[c] for r in rows) for c in cols}
        print(f"{s:14s}" + "".join(f"{med[c]:14.2f}" for c in cols) + f"{first / med['all']:10.2f}")


if __name__ == "__main__":
    main()
