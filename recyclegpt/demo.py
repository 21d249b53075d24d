"""``make demo``: SmolLM2-135M with the shipped module, every strategy on the same chat prompts."""

from __future__ import annotations

import torch

from recyclegpt.bases import DEFAULT_BASE, load_base
from recyclegpt.checkpoint import load_module
from recyclegpt.generate import Engine
from recyclegpt.modules import shipped_module

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
]


def run_demo(threads: int | None = None, max_new_tokens: int = 96) -> int:
    """Generate answers with each strategy and print text, speed and tokens per full-model call."""
    if threads:
        torch.set_num_threads(threads)
    base = load_base(DEFAULT_BASE)
    path = shipped_module(DEFAULT_BASE)
    module = load_module(path, base.backbone.config) if path is not None else None
    engine = Engine(base.backbone, base.tokenizer, module)
    strategies = ["standard", "alternating", "verified", "adaptive"] if module is not None else ["standard"]
    print(f"base: {base.name} ({base.backend} backend)")
    if module is None:
        print("module: none shipped yet for this base, so only standard decoding runs")
    else:
        print(f"module: {path.name} ({module.recycle_config.n_layers} layers)")
    engine.generate(["warm-up"], max_new_tokens=4)  # first-call allocations excluded from timings
    for prompt in PROMPTS:
        text = base.tokenizer.apply_chat([{"role": "user", "content": prompt}])
        print(f"\n### {prompt}")
        reference = None
        for name in strategies:
            g = engine.generate([text], strategy=name, max_new_tokens=max_new_tokens)[0]
            s = g.stats
            same = "" if reference is None else f", same as standard: {g.token_ids == reference}"
            reference = g.token_ids if reference is None else reference
            print(f"\n[{name}] {s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, "
                  f"{s.tau:.2f} tokens per full call{same}")
            print(g.text.strip())
    return 0
