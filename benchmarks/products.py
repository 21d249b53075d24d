"""Quantized products side by side: PyTorch's int8 / int4 CPU kernels against this project's (``csrc/qmm.h``), on
SmolLM2-135M's shapes, for 1 to 8 input rows, in one process, repetitions interleaved, medians.

    python benchmarks/products.py --threads 2 --json benchmarks/results/products_zen4.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from recyclegpt.cli import emit
from recyclegpt.hardware import measured_on, setup_cpu
from recyclegpt.quant import Int4Linear, Int8Linear

SHAPES = {"q/k/v 960x576": (960, 576), "o 576x576": (576, 576), "gate/up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="input rows per call (default 1 2 4 8)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per product (default 200)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    setup_cpu(args.threads)
    torch.manual_seed(0)
    result = {"unit": "microseconds per call, median", "rows": args.rows, "products": {}}
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.02
        for mode, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
            layers = {"pytorch": cls(w, compiled=False), "ours": cls(w, compiled=True)}
            for M in args.rows:
                x = torch.randn(M, K)
                times = {k: [] for k in layers}
                for _ in range(10):
                    for lay in layers.values():
                        lay(x)
                for _ in range(args.repeats):
                    for k, lay in layers.items():
                        t = time.perf_counter()
                        lay(x)
                        times[k].append(time.perf_counter() - t)
                row = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
                result["products"].setdefault(f"{name} {mode}", {})[M] = row
                print(f"{name:18s} {mode} M={M}: PyTorch {row['pytorch']:8.1f} us, ours {row['ours']:8.1f} us",
                      file=sys.stderr)
    return emit({**result, **measured_on()}, args.json, show=False)


if __name__ == "__main__":
    sys.exit(main())
