"""The ``recyclegpt`` command. Thin: parses arguments, calls library functions, prints results.

Errors the user can fix (bad option, missing file, unknown model...) print one ``error:`` line and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from recyclegpt.bases.registry import DEFAULT_BASE, REGISTRY
from recyclegpt.config import PRESETS
from recyclegpt.strategies import STRATEGIES

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def add_model_args(p: argparse.ArgumentParser, module: bool = True) -> None:
    """--model / --backend / --module / --threads, shared by every command that loads a model."""
    p.add_argument(
        "--model", default=DEFAULT_BASE,
        help=f"registry name ({', '.join(REGISTRY)}), Hugging Face checkpoint directory or .gguf file "
        f"(default {DEFAULT_BASE})",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "native", "hf"],
                   help="native: converted into RecycleGPT's own model (fast path, Llama/Mistral/Qwen2); "
                   "hf: any transformers causal LM; auto: native when possible (default)")
    if module:
        p.add_argument("--module", default=None,
                       help="recyclable module file (.safetensors); 'default' = the module shipped for the "
                       "default base; needed by every strategy but standard")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by generate, chat and bench."""
    p.add_argument("--strategy", default="standard", choices=list(STRATEGIES),
                   help="standard: plain decoding; alternating: the paper's full/module alternation (lossy); "
                   "verified: module drafts checked by the full model (lossless); adaptive: use the "
                   "module's token only when it is confident")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same text")
    p.add_argument("--draft-len", type=int, default=1, help="module steps per full call for verified (default 1)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="adaptive: module probability needed to use its token, in [0, 1] (default 0.5)")


def load_engine(args: argparse.Namespace):
    """Base + optional module -> ``Engine`` (and the loaded ``Base``)."""
    from recyclegpt.bases import load_base
    from recyclegpt.checkpoint import load_module
    from recyclegpt.generate import Engine
    from recyclegpt.modules import resolve_module

    base = load_base(args.model, backend=args.backend)
    module = None
    path = resolve_module(getattr(args, "module", None), base.name)
    if path is not None:
        module = load_module(path, base.backbone.config)
        tok_vocab = base.tokenizer.vocab_size
        if tok_vocab > module.config.vocab_size:
            from recyclegpt.checkpoint import CheckpointError

            raise CheckpointError(
                f"module {path} has a vocabulary of {module.config.vocab_size}; the tokenizer of "
                f"{base.name} has {tok_vocab} tokens"
            )
    return Engine(base.backbone, base.tokenizer, module), base


def sampling_from(args: argparse.Namespace):
    from recyclegpt.sampling import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


@command
def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a preset's backbone and module."""
    import torch

    from recyclegpt.recycle import RecycleGPT

    preset = PRESETS[args.preset]
    with torch.device("meta"):
        model = RecycleGPT.from_config(preset.model, preset.recycle)
    c = model.parameter_counts()
    info = {"preset": args.preset, "description": preset.description, "model": preset.model.to_dict(),
            "recycle": preset.recycle.to_dict(), **c}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset {args.preset}: {preset.description}")
    print(f"  backbone: {c['backbone'] / 1e6:8.2f} M parameters ({preset.model.n_layers} layers, "
          f"d {preset.model.d_model})")
    print(f"  module:   {c['module'] / 1e6:8.2f} M parameters ({preset.recycle.n_layers} layers + "
          f"fuse {2 * preset.model.d_model}->{preset.model.d_model}; embedding and head shared)")
    print(f"  module share: {100 * c['module_share']:.1f}% of the backbone")
    return 0


@command
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a prompt."""
    _threads(args.threads)
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give some text with --prompt")
    engine, base = load_engine(args)
    prompt = args.prompt
    if base.chat and not args.raw:
        prompt = base.tokenizer.apply_chat([{"role": "user", "content": prompt}])
    kw = dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, sampling=sampling_from(args),
              stop=args.stop or (), draft_len=args.draft_len, threshold=args.threshold)
    if args.stream and not args.json:
        stats = []
        for chunk in engine.stream(prompt, stats_out=stats, **kw):
            print(chunk, end="", flush=True)
        print()
        s = stats[0]
        print(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.tau:.2f} tokens per full call]",
              file=sys.stderr)
        return 0
    g = engine.generate([prompt], **kw)[0]
    if args.json:
        print(json.dumps({"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                          "strategy": args.strategy, "stats": g.stats.to_dict()}))
    else:
        print(g.text)
        print(f"[{g.stats.new_tokens} tokens, {g.stats.tokens_per_s:.1f} tok/s, "
              f"{g.stats.tau:.2f} tokens per full call]", file=sys.stderr)
    return 0


@command
def cmd_bases(args: argparse.Namespace) -> int:
    """List the known base models."""
    for spec in REGISTRY.values():
        print(f"{spec.name:14s} {spec.description}  [install: {spec.install}]")
    return 0


@command
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: SmolLM2-135M with the shipped module."""
    from recyclegpt.demo import run_demo

    return run_demo(threads=args.threads, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recyclegpt",
        description="RecycleGPT: faster decoding by recycling the hidden state a language model already "
        "computed. Every command has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts of a preset's backbone and module",
                       description=cmd_info.__doc__)
    p.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS), help="preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("bases", help="list the known base models", description=cmd_bases.__doc__)

    p = sub.add_parser("generate", help="generate text from a prompt", description=cmd_generate.__doc__)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--stop", action="append", help="a string that ends generation (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and stats")

    p = sub.add_parser("demo", help="run the main job on the embedded default base and module",
                       description=cmd_demo.__doc__)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recyclegpt`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # our error types all derive from ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
