"""Perplexity of the quantized base against llama.cpp's formats of the same model, on held-out text.

Scores the same windows of each text file with the engine's base in float32, ``--quant int8`` and ``--quant
int4``, and with llama.cpp (llama-cpp-python) on the base's GGUF file in Q8_0 and Q4_0, made with llama.cpp's
own quantizer (``bases.llamacpp``). Windows: the first ``--windows`` disjoint windows of ``--seq-len`` tokens
of each file (``data.read_tokens``), each scored on its own, as ``recyclegpt eval`` scores text; the same token
ids go to both tools. Also reports how often each quantized base's top-1 equals float32's.

    recyclegpt data split data/corpora/kjv.txt data/corpora/austen.txt --out data/split
    python benchmarks/quant_quality.py --text data/split/heldout/austen.txt data/split/heldout/kjv.txt \\
        --json benchmarks/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime

import torch
from tqdm import tqdm

from recyclegpt import load
from recyclegpt.bases.llamacpp import LlamaCpp, quantized_gguf
from recyclegpt.data import read_tokens
from recyclegpt.evaluate import score_tokens
from recyclegpt.hardware import measured_on, setup_cpu

OURS = ("none", "int8", "int4")
THEIRS = ("q8_0", "q4_0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the base: registry name or .gguf file")
    p.add_argument("--text", nargs="+", required=True, help="held-out text files to score")
    p.add_argument("--windows", type=int, default=20, help="windows per file (default 20)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both tools (default 2)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    if args.windows < 1 or args.seq_len < 3:
        p.error("--windows must be >= 1 and --seq-len >= 3")
    setup_cpu(args.threads)
    engines = {q: load(args.model, quant=q, prepack=False) for q in OURS}
    tokenizer = engines["none"].tokenizer
    llamas = {f: LlamaCpp(quantized_gguf(args.model, f, args.threads), threads=args.threads, n_ctx=args.seq_len,
                          scores=True) for f in THEIRS}
    texts = {}
    for path in args.text:
        ids = read_tokens(path, tokenizer, args.windows * args.seq_len)
        windows = [ids[i : i + args.seq_len] for i in range(0, len(ids), args.seq_len)]
        texts[path] = [w for w in windows if len(w) == args.seq_len]
    nll = {name: {path: 0.0 for path in texts} for name in (*OURS, *THEIRS)}
    same_top = {q: {path: 0 for path in texts} for q in OURS[1:]}
    bar = tqdm(total=sum(map(len, texts.values())), unit="window", file=sys.stderr)
    for path, windows in texts.items():
        for w in windows:
            tokens = torch.tensor([w])
            scores = {q: score_tokens(e.backbone, None, tokens) for q, e in engines.items()}
            for q, s in scores.items():
                nll[q][path] += float(s.base_nll.sum())
            for q in OURS[1:]:
                same_top[q][path] += int((scores[q].base_top == scores["none"].base_top).sum())
            for f, llm in llamas.items():
                nll[f][path] -= sum(llm.logprobs(w))
            bar.update()
    bar.close()
    targets = {path: len(ws) * (args.seq_len - 1) for path, ws in texts.items()}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "seq_len": args.seq_len,
        "windows": {path: len(ws) for path, ws in texts.items()}, "targets": targets,
        "perplexity": {name: {path: math.exp(v / targets[path]) for path, v in per.items()}
                       for name, per in nll.items()},
        "top1_equal_to_float32": {q: {path: n / targets[path] for path, n in per.items()}
                                  for q, per in same_top.items()},
        "llama_cpp_files": {f: str(llm.path) for f, llm in llamas.items()},
        **measured_on(),
    }
    names = {"none": "ours, float32", "int8": "ours, --quant int8", "int4": "ours, --quant int4",
             "q8_0": "llama.cpp Q8_0", "q4_0": "llama.cpp Q4_0"}
    print("| weights | " + " | ".join(f"{path} perplexity" for path in texts) + " |")
    print("|---|" + "---|" * len(texts))
    for name, label in names.items():
        print(f"| {label} | " + " | ".join(f"{result['perplexity'][name][path]:.2f}" for path in texts) + " |")
    line = json.dumps(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
