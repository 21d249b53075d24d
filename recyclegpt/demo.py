"""``make demo``: SmolLM2-135M with the shipped module, every strategy (prompt lookup too) on the same chat
prompts."""

from __future__ import annotations

from recyclegpt import load
from recyclegpt.bases import DEFAULT_BASE
from recyclegpt.hardware import setup_cpu
from recyclegpt.modules import shipped_module

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
]


def run_demo(threads: int | None = None, max_new_tokens: int = 96) -> int:
    """Generate answers with each strategy and print text, speed and tokens per full-model call."""
    setup_cpu(threads)
    path = shipped_module(DEFAULT_BASE)
    engine, base = load(DEFAULT_BASE, "default" if path is not None else None, with_base=True)
    module = engine.module
    strategies = ["standard", "alternating", "verified", "adaptive", "lookup"] if module is not None else [
        "standard", "lookup"]
    print(f"base: {base.name} ({base.backend} backend)")
    if module is None:
        print("module: none shipped yet for this base, so only standard decoding and prompt lookup run")
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
