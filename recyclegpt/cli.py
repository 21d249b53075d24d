"""The ``recyclegpt`` command. Thin: parses arguments, calls library functions, prints results.

Errors the user can fix (bad option, missing file, unknown model...) print one ``error:`` line and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from recyclegpt.bases.registry import DEFAULT_BASE, DTYPES, QUANTS, REGISTRY
from recyclegpt.config import PRESETS
from recyclegpt.strategies import STRATEGIES

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _threads(n: int | None) -> None:
    """CPU set-up of every command that computes: torch's thread count (None: torch's default) and an
    allocator that keeps freed memory (``keep_freed_memory``)."""
    import torch

    keep_freed_memory()
    if n:
        torch.set_num_threads(n)


def keep_freed_memory() -> bool:
    """Have glibc serve large allocations from its heap and keep what is freed, for this process; returns
    whether it could (False off glibc, which is then left as it is).

    By default glibc maps every block over 32 MB (a training batch's logits and activations) freshly from
    the kernel, which zero-fills it page by page, and unmaps it when freed: every step pays again. On the
    2-core AMD EPYC virtual machine this was 86 of 131 s of system time over 10 steps of ``train --preset
    small`` (batch 8 x 512); with this setting the same 10 steps took 79 s (30 s of it system time) and gave
    the same losses. ``attach`` steps (batch 16 x 256, cached hidden states) ran 1.24x faster. The price is
    resident memory that stays near its peak (7.9 against 4.9 GB for those training steps).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def add_model_args(
    p: argparse.ArgumentParser, module: bool = True, compile: bool = False, precision: bool = False
) -> None:
    """--model / --backend / --module / --threads; --compile for the decoding commands; --dtype and --prepack
    for them and for the scoring commands (``precision``), so quality is measured as decoding runs."""
    p.add_argument(
        "--model", default=DEFAULT_BASE,
        help=f"registry name ({', '.join(REGISTRY)}), Hugging Face checkpoint directory, .gguf file, or the "
        f"run directory of a `recyclegpt train` run (default {DEFAULT_BASE})",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "native", "hf"],
                   help="native: converted into RecycleGPT's own model (fast path, Llama/Mistral/Qwen2); "
                   "hf: any transformers causal LM; auto: native when possible (default)")
    if module:
        p.add_argument("--module", default=None,
                       help="recyclable module file (.safetensors; a training run writes RUN/module.safetensors); "
                       "'default' = the module shipped for the default base; needed by every strategy but standard")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="decode through torch.compile (native backend; needs a C++ compiler): the first "
                       "requests compile for tens of seconds, later steps run faster")
    if compile or precision:
        p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="precision of base and module (default float32); bfloat16 is faster only with native "
                       "bfloat16 products, and verified is then exact only up to rounding (docs/decoding.md)")
        p.add_argument("--prepack", action="store_true",
                       help="multiply through oneDNN with the weights packed once (native backend, not with "
                       "--compile; a second copy of the weights; float32 results unchanged; docs/decoding.md)")
        p.add_argument("--quant", default="none", choices=list(QUANTS),
                       help="weight-only quantized products for base and module: int8 (a scale per row) or "
                       "int4 (groups of 32; the head in int8), 4-7x fewer bytes per step; verified stays exact "
                       "against standard decoding of the same quantized model (default none; native backend)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device, for the commands that make data, train and measure quality (the decoding commands, whose
    figures are CPU speeds, stay on the CPU)."""
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda or cuda:N; under torchrun, cuda is each "
                   "process's own GPU (LOCAL_RANK)")


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    """--strategy / --draft-len / --draft-width / --threshold, shared by every command that decodes."""
    p.add_argument("--strategy", default="standard", choices=list(STRATEGIES),
                   help="standard: plain decoding; alternating: the paper's full/module alternation (lossy); "
                   "verified: module drafts checked by the full model (lossless); adaptive: use the "
                   "module's token only when it is confident; lookup: drafts copied from the context (prompt "
                   "lookup) checked by the full model (lossless, no module)")
    p.add_argument("--draft-len", type=int, default=None,
                   help="drafts per full call: verified (default 1), lookup (default 10)")
    p.add_argument("--draft-width", type=int, default=1,
                   help="verified: candidates for the first draft's slot checked in the same full call (default 1; "
                   "native backend; docs/decoding.md)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="adaptive: module probability needed to use its token, in [0, 1] (default 0.5)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by generate, chat and bench (the strategy options included)."""
    add_strategy_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same text")


def load_engine(args: argparse.Namespace):
    """Base + optional module from the command line -> (``Engine``, ``Base``)."""
    from recyclegpt.bases import load_engine as _load

    return _load(args.model, getattr(args, "module", None), args.backend, getattr(args, "compile", False),
                 getattr(args, "dtype", "float32"), getattr(args, "prepack", False), getattr(args, "device", "cpu"),
                 getattr(args, "quant", "none"))


def sampling_from(args: argparse.Namespace):
    from recyclegpt.sampling import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


@command
def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a preset's backbone and module, and this machine's CPU (model, vector features)."""
    import torch

    from recyclegpt.hardware import cpu_info
    from recyclegpt.recycle import RecycleGPT

    preset = PRESETS[args.preset]
    with torch.device("meta"):
        model = RecycleGPT.from_config(preset.model, preset.recycle)
    c = model.parameter_counts()
    cpu = cpu_info()
    info = {"preset": args.preset, "description": preset.description, "model": preset.model.to_dict(),
            "recycle": preset.recycle.to_dict(), **c, "cpu": cpu.record()}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset {args.preset}: {preset.description}")
    print(f"  backbone: {c['backbone'] / 1e6:8.2f} M parameters ({preset.model.n_layers} layers, "
          f"d {preset.model.d_model})")
    print(f"  module:   {c['module'] / 1e6:8.2f} M parameters ({preset.recycle.n_layers} layers + "
          f"fuse {2 * preset.model.d_model}->{preset.model.d_model}; embedding and head shared)")
    print(f"  module share: {100 * c['module_share']:.1f}% of the backbone")
    print(f"cpu: {cpu.describe()}")
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
              stop=args.stop or (), draft_len=args.draft_len, threshold=args.threshold, draft_width=args.draft_width)
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


def _chat_prompt(engine, system: list[dict[str, str]], history: list[dict[str, str]], room: int) -> str | None:
    """The prompt for ``system + history`` that leaves ``room`` tokens for the reply.

    Drops the oldest exchanges from ``history`` (in place) until it fits; None if the last message
    alone does not.
    """
    limit = engine.backbone.config.max_seq_len
    while True:
        prompt = engine.tokenizer.apply_chat(system + history)
        if len(engine.tokenizer.encode(prompt)) + room + 1 <= limit:
            return prompt
        if len(history) == 1:
            return None
        del history[:2]  # the oldest user message and its reply


@command
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat in the terminal: each line you type gets a streamed reply; /exit or end of input quits."""
    from recyclegpt.strategies import make_strategy

    _threads(args.threads)
    engine, _ = load_engine(args)
    if make_strategy(args.strategy, args.draft_len, args.threshold, args.draft_width).uses_module \
            and engine.module is None:
        raise ValueError(f"strategy {args.strategy!r} needs a recyclable module; pass --module PATH")
    kw = dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, sampling=sampling_from(args),
              draft_len=args.draft_len, threshold=args.threshold, draft_width=args.draft_width)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("type a message; /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = _chat_prompt(engine, system, history, args.max_new_tokens)
        if prompt is None:
            history.pop()
            print(f"error: this message and --max-new-tokens {args.max_new_tokens} do not fit the context of "
                  f"{engine.backbone.config.max_seq_len} tokens", file=sys.stderr)
            continue
        stats, reply = [], []
        for chunk in engine.stream(prompt, stats_out=stats, **kw):
            print(chunk, end="", flush=True)
            reply.append(chunk)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        s = stats[0]
        print(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.tau:.2f} tokens per full call]",
              file=sys.stderr)


@command
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, streaming)."""
    import uvicorn

    from recyclegpt.server import create_app

    _threads(args.threads)
    engine, base = load_engine(args)
    app = create_app(
        engine, args.served_model_name or base.name, default_strategy=args.strategy, api_key=args.api_key,
        chat=base.chat or bool(base.tokenizer.chat_template), draft_len=args.draft_len, threshold=args.threshold,
        draft_width=args.draft_width,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


@command
def cmd_bases(args: argparse.Namespace) -> int:
    """List the known base models."""
    for spec in REGISTRY.values():
        print(f"{spec.name:14s} {spec.description}  [install: {spec.install}]")
    return 0


@command
def cmd_data(args: argparse.Namespace) -> int:
    """Prepare training data: tokenize text files, distill a base's own answers, merge directories, or split
    corpus files into their held-in (training) and held-out (evaluation) parts."""
    from recyclegpt import data, workflows

    _threads(args.threads)
    no_model = ("prepare", "merge", "split")
    for flag, what in (("bf16", "runs the base in bfloat16"), ("prepack", "packs the base's weights")):
        if getattr(args, flag) and args.action in no_model:
            raise ValueError(f"--{flag} {what}, so it applies to data distill and data prompts only; "
                             f"data {args.action} runs no model")
    if args.device != "cpu" and args.action in no_model:
        raise ValueError(f"--device places the base that generates, so it applies to data distill and data prompts "
                         f"only; data {args.action} runs no model")
    if args.exclude and args.action in no_model:
        raise ValueError(f"--exclude keeps prompts out, so it applies to data prompts and data distill only; "
                         f"data {args.action} reads no prompts")
    if args.action == "split":
        print(json.dumps(data.split_corpora(args.inputs, args.out)))
        return 0
    if args.action == "merge":
        meta = data.merge(args.inputs, args.out)
    else:
        from recyclegpt.bases import load_base, load_engine, resolve_device

        resolve_device(args.device)  # a missing GPU fails before anything loads
        # Prompt and exclusion files are read before the base loads, so a bad one fails at once.
        excluded = [q for path in args.exclude for q in data.read_prompts(path)]
        if args.action == "distill":
            if not args.prompts:
                raise ValueError("data distill needs --prompts FILE: the prompts whose greedy answers it stores")
            prompts, dropped = data.exclude_prompts(data.read_prompts(args.prompts), excluded)
            if dropped:
                print(f"--exclude: dropped {dropped} of the prompts in {args.prompts}", file=sys.stderr)

        if args.action == "prepare":
            base = load_base(args.model, backend=args.backend)
            meta = data.prepare(args.inputs, base.tokenizer, args.out, args.val_fraction, base.name)
        else:
            engine, base = load_engine(args.model, None, args.backend, dtype="bfloat16" if args.bf16 else "float32",
                                       prepack=args.prepack, device=args.device)
            if args.action == "prompts":
                meta = workflows.self_prompts(engine, args.n, args.out, args.batch_size, seed=args.seed,
                                              exclude=excluded)
                print(json.dumps(meta))
                return 0
            prompts = prompts[: args.limit or None]
            meta = workflows.distill(engine, prompts, args.out, args.max_new_tokens, args.batch_size,
                                     args.val_fraction, base.chat, base.name)
    print(json.dumps(meta["tokens"]))
    return 0


def _build_model(args: argparse.Namespace, data):
    """The RecycleGPT to train: a preset from scratch (train) or a loaded base plus a new module (attach).

    Also returns the identity stored with the weights: the base (attach) or the data's tokenizer (train),
    which is how ``--model RUN_DIR`` finds the tokenizer of a model trained from scratch.
    """
    import torch

    from recyclegpt.bases import resolve_device
    from recyclegpt.config import RecycleConfig, get_preset
    from recyclegpt.recycle import RecycleGPT

    device = resolve_device(args.device)  # checked before anything loads
    torch.manual_seed(args.seed)  # same initialisation in every process and every rerun
    if args.command == "train":
        preset = get_preset(args.preset)
        rcfg = preset.recycle.replace(
            n_layers=args.module_layers or preset.recycle.n_layers, recycle_weight=args.recycle_weight
        )
        model = RecycleGPT.from_config(preset.model.replace(max_seq_len=max(args.seq_len, 8)), rcfg).to(device)
        return model, {"tokenizer": data.meta["tokenizer"]} if data.meta.get("tokenizer") else {}
    from recyclegpt.bases import load_base

    base = load_base(args.base, backend=args.backend)
    info = {"name": base.name, "backend": base.backend}
    if args.init:
        return RecycleGPT(base.backbone, _init_module(args, base)).to(device), info
    rcfg = RecycleConfig(n_layers=args.module_layers or 1, grad_to_backbone=False)
    model = RecycleGPT(base.backbone, rcfg=rcfg)
    if args.draft_vocab:
        ids, info["draft_vocab_coverage"] = data.draft_vocab(args.draft_vocab)
        model.module.set_draft_vocab(ids)
    return model.to(device), info


def _init_module(args: argparse.Namespace, base):
    """The trained module an attach run starts from (``--init``): its depth and draft vocabulary are kept,
    its copy gate is dropped (it was fitted to the old weights: refit it with ``copy-gate``)."""
    from recyclegpt.checkpoint import CheckpointError, load_module
    from recyclegpt.modules import resolve_module

    path = resolve_module(args.init, base.name)
    module = load_module(path, base.backbone.config)
    layers = module.recycle_config.n_layers
    if args.module_layers not in (None, layers):
        raise CheckpointError(f"--init {args.init} has {layers} module layers; --module-layers "
                              f"{args.module_layers} disagrees (leave it out to keep the module's depth)")
    module.recycle_config = module.recycle_config.replace(grad_to_backbone=False)
    module.set_copy_gate(None)
    return module


@command
def cmd_draft_vocab(args: argparse.Namespace) -> int:
    """Give a trained module a draft vocabulary: the N most frequent tokens of prepared data. The module
    then proposes only those tokens, so each module step reads N rows of the head instead of all of them
    (verified decoding stays exact); prints the share of the data's tokens the vocabulary covers."""
    from recyclegpt.checkpoint import CheckpointError, load_module_file, save_module
    from recyclegpt.data import TokenData

    module, base = load_module_file(args.module)
    data = TokenData(args.data)
    if data.vocab_size > module.config.vocab_size:
        raise CheckpointError(
            f"{args.data} was tokenized with a vocabulary of {data.vocab_size}; the module {args.module} has "
            f"{module.config.vocab_size}: use data prepared with the module's tokenizer"
        )
    ids, coverage = data.draft_vocab(args.size)
    module.set_draft_vocab(ids)
    save_module(args.out, module, {**base, "draft_vocab_coverage": coverage})
    print(json.dumps({"out": args.out, "size": int(ids.numel()), "coverage": coverage}))
    return 0


@command
def cmd_copy_gate(args: argparse.Namespace) -> int:
    """Teach a trained module to copy from the context: fit the gate that mixes a token copied from an
    earlier occurrence of the current n-gram into the module's proposals (recyclegpt/copy_gate.py), on the
    base's greedy answers to --prompts and on --text, then save the module with it. Decoding and
    evaluation use the mixture from then on; verified decoding stays exact."""
    from recyclegpt.checkpoint import load_module_file, save_module
    from recyclegpt.data import read_prompts
    from recyclegpt.modules import resolve_module
    from recyclegpt.workflows import fit_copy_gate

    _threads(args.threads)
    if args.module is None:
        raise ValueError("copy-gate needs the module to fit: pass --module PATH (or 'default')")
    prompts = read_prompts(args.prompts)
    engine, base = load_engine(args)
    _, identity = load_module_file(resolve_module(args.module, base.name))
    report = fit_copy_gate(engine, prompts, args.text, args.max_new_tokens, args.text_tokens, args.seq_len,
                           base.chat, args.batch_size)
    save_module(args.out, engine.module, identity)
    _emit_json({"out": args.out, **report}, None)
    return 0


@command
def cmd_average(args: argparse.Namespace) -> int:
    """Average the weights of modules trained for one base, e.g. a module and its fine-tunes made with
    `attach --init` (a model soup: the average often predicts better than any one of them). The copy
    gates are dropped; refit the average's with copy-gate."""
    import hashlib
    from pathlib import Path

    from recyclegpt.checkpoint import average_modules, save_module
    from recyclegpt.modules import resolve_module

    paths = [resolve_module(m, args.base) for m in args.modules]
    module, identity = average_modules(paths, args.weights)
    # Each input as it was named on the command line, with its content's SHA-256: a path alone stops
    # identifying a file once that file is replaced (as the shipped module is by an average of itself).
    inputs = [{"file": m, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
              for m, p in zip(args.modules, paths, strict=True)]
    recipe = {"averaged": inputs, "weights": args.weights or [1.0] * len(paths)}
    save_module(args.out, module, {**identity, **recipe})
    _emit_json({"out": args.out, **recipe}, None)
    return 0


def _train_config(args: argparse.Namespace):
    from recyclegpt.config import TrainConfig

    return TrainConfig(
        mode="joint" if args.command == "train" else "attach", steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, min_lr=args.lr * 0.1, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=1.0, ce_weight=getattr(args, "ce_weight", 0.0),
        feature_weight=getattr(args, "feature_weight", 0.0), bf16=args.bf16,
        eval_every=args.eval_every, eval_batches=args.eval_batches, ckpt_every=args.ckpt_every, seed=args.seed,
    )


@command
def cmd_train(args: argparse.Namespace) -> int:
    """Train a RecycleGPT from scratch with the joint loss (lambda 0 = a plain GPT baseline)."""
    return _run_training(args)


@command
def cmd_attach(args: argparse.Namespace) -> int:
    """Train a recyclable module on a frozen pretrained base (distillation to its next-step distribution)."""
    return _run_training(args)


def _run_training(args: argparse.Namespace) -> int:
    from recyclegpt.data import TokenData
    from recyclegpt.train import Trainer, hidden_cache

    _threads(args.threads)
    cfg = _train_config(args)
    data = TokenData(args.data)
    model, base = _build_model(args, data)
    if getattr(args, "hidden_cache", None):
        identity = {k: base[k] for k in ("name", "backend")}  # the hidden states depend on nothing else
        data = hidden_cache(model, data, args.hidden_cache, args.seq_len, identity, args.bf16)
    history = Trainer(model, data, cfg, args.out, base).run(resume=args.resume)
    last = history[-1] if history else {}
    print(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    return 0


def _add_train_args(p: argparse.ArgumentParser, lr: float, layers_help: str) -> None:
    p.add_argument("--data", required=True, help="prepared data directory (recyclegpt data prepare/distill)")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, module.safetensors, log.jsonl")
    p.add_argument("--module-layers", type=int, default=None, help=layers_help)
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, over all processes (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr}); cosine to lr/10")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (default 50)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps (default 100)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_arg(p)


@command
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: SmolLM2-135M with the shipped module."""
    from recyclegpt.demo import run_demo

    return run_demo(threads=args.threads, max_new_tokens=args.max_new_tokens)


def _emit_json(result: dict, path: str | None, measured: bool = False) -> None:
    """Print ``result`` as one JSON line and, if ``path`` is given, write it there too; a ``measured`` result
    (bench, eval, lm-eval) also records the CPU, torch version and threads it ran with."""
    if measured:
        import torch

        from recyclegpt.hardware import cpu_info

        result = {**result, "cpu": cpu_info().record(), "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
    line = json.dumps(result)
    if path:
        from pathlib import Path

        Path(path).write_text(line + "\n")
    print(line)


@command
def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of the base and under the alternating scheme, module agreement, and tau / acceptance of
    verified decoding: one JSON object (see recyclegpt/evaluate.py for the exact definitions)."""
    from recyclegpt.bases import module_for
    from recyclegpt.data import distilled_answers, open_distilled, read_prompts
    from recyclegpt.evaluate import EvalError, answer_metrics, evaluate

    _threads(args.threads)
    if args.module is None:
        raise EvalError("eval needs a recyclable module: pass --module PATH (or 'default')")
    if not (args.data or args.prompts or args.answers):
        raise EvalError("eval needs something to score: --data TEXT, --prompts FILE or --answers DIR (or several)")
    if args.compare_module and not args.answers:
        raise EvalError("--compare-module scores a second module on stored answers: give --answers DIR too")
    prompts = read_prompts(args.prompts) if args.prompts else None
    stored = open_distilled(args.answers) if args.answers else None  # a bad directory fails before the base loads
    engine, base = load_engine(args)
    result = evaluate(engine, args.data, prompts, args.max_tokens, args.seq_len, args.batch_size,
                      args.max_new_tokens, base.chat, args.draft_len, args.draft_width)
    if stored is not None:
        answers = distilled_answers(stored, engine.tokenizer, base.chat)
        other = (module_for(base, args.compare_module, args.dtype, args.prepack, args.quant)
                 if args.compare_module else None)
        metrics = answer_metrics(engine.backbone, engine.module, answers, compare=other)
        if other is not None:
            metrics["compare"] = {"module": args.compare_module, **metrics["compare"]}
        result["answers"] = {"dir": args.answers, **metrics}
    _emit_json({"model": base.name, "module": args.module, "dtype": args.dtype, "prepack": args.prepack,
                "quant": args.quant, **result}, args.json, measured=True)
    return 0


@command
def cmd_bench(args: argparse.Namespace) -> int:
    """Decode speed of every strategy and of transformers' generate (greedy, prompt lookup) on the same
    weights and prompts: a table, then one JSON line (see recyclegpt/bench.py for the timing rules). Rows
    are interleaved and their order rotates from pass to pass; tok/s divides each row's own new tokens
    (shown beside it), and the JSON keeps every timed run's seconds, tokens and tok/s per row."""
    from recyclegpt import bench
    from recyclegpt.data import prompt_ids, read_prompts

    _threads(args.threads)
    prompts = read_prompts(args.prompts)
    engine, base = load_engine(args)
    kinds = bench.plan_kinds(args.strategies, engine.module is not None)
    tok = engine.tokenizer
    ids = [prompt_ids(tok, p, base.chat) for p in prompts]
    rows = bench.engine_rows(engine, kinds, args.max_new_tokens, args.draft_lens, args.thresholds,
                             draft_widths=args.draft_widths)
    if args.compare_modules:
        from pathlib import Path

        from recyclegpt.bases import module_for

        if engine.module is None:
            raise bench.BenchError("--compare-module needs --module too: it compares modules on one base")
        labels: list[str] = []
        for path in args.compare_modules:
            file = Path(path)
            labels.append(file.stem if file.stem not in labels else f"{file.parent.name}/{file.stem}")
            rows += bench.engine_rows(engine.with_module(module_for(base, path, args.dtype, args.prepack, args.quant)),
                                      [k for k in kinds if k in bench.MODULE_KINDS], args.max_new_tokens,
                                      args.draft_lens, args.thresholds, module=labels[-1],
                                      draft_widths=args.draft_widths)
    if any(k in bench.HF_ROWS for k in kinds):
        hf_model = bench.hf_model_for(base).to(next(engine.backbone.parameters()).dtype)  # same precision
        rows += bench.hf_rows(hf_model, kinds, args.max_new_tokens, tok.eos_token_ids, tok.pad_token_id)
    result = bench.run_bench(rows, ids, args.repeats, progress=lambda line: print(line, file=sys.stderr))
    result = {"model": base.name, "module": args.module, "compare_modules": args.compare_modules or [],
              "max_new_tokens": args.max_new_tokens, "compile": args.compile, "dtype": args.dtype,
              "prepack": args.prepack, "quant": args.quant, **result}
    print(bench.format_table(result))
    _emit_json(result, args.json, measured=True)
    if args.plot:
        bench.plot(result, args.plot)
    return 0


@command
def cmd_lm_eval(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness tasks offline (by default the local ones in benchmarks/tasks), with
    standard and/or alternating scoring (see recyclegpt/lm_eval_adapter.py)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only; read when datasets is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from recyclegpt.lm_eval_adapter import RecycleLM, run_tasks
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}); install it with: pip install 'recyclegpt[eval]'") from None
    from recyclegpt.evaluate import paired_flips

    _threads(args.threads)
    engine, base = load_engine(args)
    results, items, unreachable = {}, {}, {}
    for scoring in args.scoring or (["standard", "alternating"] if engine.module is not None else ["standard"]):
        lm = RecycleLM(engine.backbone, engine.tokenizer, engine.module, scoring, args.batch_size)
        results[scoring], items[scoring] = run_tasks(lm, args.tasks_dir, args.tasks, args.limit)
        if scoring == "alternating":  # items with a choice alternating decoding cannot produce
            unreachable = {task: len(lm.unreachable.get(task, ())) for task in items[scoring]}
    for scoring, tasks in results.items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{scoring:12s} {task:32s} {shown}", file=sys.stderr)
    # standard against alternating item by item: which items the module's scoring lost and won
    paired = {}
    if len(items) == 2:
        for task, metrics in items["standard"].items():
            paired[task] = {m: paired_flips(v, items["alternating"][task][m]) for m, v in metrics.items()}
            for m, f in paired[task].items():
                print(f"{'paired':12s} {task:32s} {m} {f['standard']:.4f} -> {f['alternating']:.4f} "
                      f"({f['diff_points']:+.1f} points; {f['right_to_wrong']} right->wrong, "
                      f"{f['wrong_to_right']} wrong->right; McNemar p {f['mcnemar_p']:.3f})", file=sys.stderr)
    _emit_json({"model": base.name, "module": args.module, "dtype": args.dtype, "prepack": args.prepack,
                "quant": args.quant, "limit": args.limit, "results": results, "paired": paired,
                "unreachable_items": unreachable, "items": items}, args.json, measured=True)
    return 0


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
    add_model_args(p, compile=True)
    add_sampling_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--stop", action="append", help="a string that ends generation (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and stats")

    p = sub.add_parser("data", help="prepare training data", description=cmd_data.__doc__)
    p.add_argument("action", choices=["prepare", "prompts", "distill", "merge", "split"],
                   help="prepare: tokenize text files; prompts: sample user prompts from a chat model itself "
                   "(JSONL at --out); distill: the base's own greedy answers to prompts; merge: concatenate "
                   "prepared directories; split: write corpus files' first 90 %% of lines to OUT/heldin and "
                   "the held-out last 10 %% to OUT/heldout")
    p.add_argument("inputs", nargs="*", help="prepare: text files (.txt .md .rst .jsonl .parquet); "
                   "merge: prepared directories; split: corpus files (scripts/fetch_corpora.py)")
    p.add_argument("--out", required=True, help="output directory (prompts: the JSONL file)")
    p.add_argument("--model", default=DEFAULT_BASE, help=f"whose tokenizer / generations (default {DEFAULT_BASE})")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "hf"], help="backbone path")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share held out for validation (default 0.01)")
    p.add_argument("--prompts", help="distill: prompt file (one per line, or JSONL with a 'prompt' field)")
    p.add_argument("--limit", type=int, default=0, help="distill: use only the first N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="distill: answer length cap (default 128)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="distill, prompts: sequences decoded together (default 16)")
    p.add_argument("--n", type=int, default=1000, help="prompts: how many to keep (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="prompts: sampling seed (default 0)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="FILE",
                   help="prompts, distill: prompt files (one per line, or JSONL with a 'prompt' field) whose "
                   "prompts are kept out, with their near-duplicates (equal ignoring case, punctuation and spacing, "
                   "or sharing 80 %% of their word trigrams): benchmark and held-out prompts")
    p.add_argument("--bf16", action="store_true",
                   help="distill, prompts: run the base in bfloat16 (answers then follow the bfloat16 model; "
                   "docs/training.md)")
    p.add_argument("--prepack", action="store_true",
                   help="distill, prompts: multiply through oneDNN with the base's weights packed once (native "
                   "backend, CPU); answers stay float32 greedy")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_arg(p)

    p = sub.add_parser("train", help="train a RecycleGPT from scratch (joint loss)", description=cmd_train.__doc__)
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="model shape (default small)")
    p.add_argument("--recycle-weight", type=float, default=1.0,
                   help="lambda of the recycle loss (default 1; 0 trains a plain GPT baseline)")
    _add_train_args(p, 6e-4, "module depth (default: the preset's)")

    p = sub.add_parser("attach", help="train a module for a frozen pretrained base", description=cmd_attach.__doc__)
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"registry name, HF directory or .gguf (default {DEFAULT_BASE})")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "hf"], help="backbone path")
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of the text-token cross-entropy added to the KL (default 0)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="weight of a SmoothL1 regression of the module's state onto the base's next final hidden "
                   "state, added to the KL (default 0)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="the module proposes only the N most frequent tokens of the training data, which "
                   "makes each module step cheaper (the head is the largest matrix); 0 = the whole vocabulary "
                   "(default 8192; with --init, the module's own)")
    p.add_argument("--init", default=None, metavar="MODULE",
                   help="fine-tune a trained module (.safetensors, or 'default' for the one shipped for the base) "
                   "instead of a new one: its depth and draft vocabulary are kept, its copy gate is dropped "
                   "(refit it with copy-gate)")
    p.add_argument("--hidden-cache", default=None, metavar="DIR",
                   help="compute the frozen base's hidden states over the data's windows once, store them in "
                   "DIR (bfloat16 hidden states, one per token) and train from them: each step then costs "
                   "the module alone; reused when DIR holds a cache for the same base, data and --seq-len")
    _add_train_args(p, 1e-3, "module depth (default 1)")

    p = sub.add_parser("draft-vocab", help="restrict a trained module's proposals to the most frequent tokens",
                       description=cmd_draft_vocab.__doc__)
    p.add_argument("--module", required=True, help="module file (.safetensors) to read")
    p.add_argument("--data", required=True, help="prepared data directory whose train split is counted")
    p.add_argument("--size", type=int, default=8192, help="draft vocabulary size (default 8192)")
    p.add_argument("--out", required=True, help="module file to write (may equal --module)")

    p = sub.add_parser("copy-gate", help="fit a module's in-context copy gate and save the module with it",
                       description=cmd_copy_gate.__doc__)
    add_model_args(p)
    add_device_arg(p)
    p.add_argument("--prompts", required=True, help="prompt file (one per line, or JSONL with a 'prompt' field): "
                   "the base's greedy answers to them are fitted on; use prompts no evaluation uses")
    p.add_argument("--text", nargs="*", default=[], metavar="FILE",
                   help="text files fitted on too (.txt .md .rst .jsonl .parquet), e.g. held-in corpus text")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length (default 128)")
    p.add_argument("--text-tokens", type=int, default=8192, help="tokens read from each --text file (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window of --text in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--out", required=True, help="module file to write (may equal --module)")

    p = sub.add_parser("average", help="average the weights of a module and its fine-tunes (a model soup)",
                       description=cmd_average.__doc__)
    p.add_argument("modules", nargs="+", metavar="MODULE",
                   help="two or more module files of one base ('default' = the base's shipped module)")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per module, normalised to sum 1 (default: equal)")
    p.add_argument("--base", default="smollm2-135m", help="base whose shipped module 'default' names "
                   "(default smollm2-135m)")
    p.add_argument("--out", required=True, help="module file to write")

    p = sub.add_parser("chat", help="chat in the terminal, replies streamed with their speed",
                       description=cmd_chat.__doc__)
    add_model_args(p, compile=True)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API", description=cmd_serve.__doc__)
    add_model_args(p, compile=True)
    add_strategy_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("RECYCLEGPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $RECYCLEGPT_API_KEY; "
                   "none if unset)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients must send (default: the name given to --model)")

    p = sub.add_parser("demo", help="run the main job on the embedded default base and module",
                       description=cmd_demo.__doc__)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")

    p = sub.add_parser("eval", help="perplexity (base / alternating), module agreement, tau: one JSON object",
                       description=cmd_eval.__doc__)
    add_model_args(p, precision=True)
    add_device_arg(p)
    p.add_argument("--data", default=None, help="text file for the perplexities and the agreement on natural "
                   "text (.txt .md .rst .jsonl .parquet); give it, --prompts or --answers, or any of them together")
    p.add_argument("--prompts", default=None, help="prompt file (one per line, or JSONL with a 'prompt' field): "
                   "agreement on the base's own greedy answers, tau and acceptance of verified decoding")
    p.add_argument("--answers", default=None, metavar="DIR",
                   help="a `data distill` output made with this base: agreement on its stored greedy answers, "
                   "scored without decoding them again, with a 95%% bootstrap interval; "
                   "use prompts the module never trained on")
    p.add_argument("--compare-module", default=None, metavar="PATH",
                   help="with --answers: also score this module (same base) on the same answer slots and report "
                   "the paired difference (it - --module) with a 95%% bootstrap interval, and the slots only one of "
                   "the two gets right; the base runs once for both")
    p.add_argument("--max-tokens", type=int, default=20000, help="tokens of --data to score (default 20000)")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length for --prompts (default 128)")
    p.add_argument("--draft-len", type=int, default=1, help="drafts per full call of the verified run (default 1)")
    p.add_argument("--draft-width", type=int, default=1,
                   help="candidates for the first draft's slot in the verified run (default 1)")
    p.add_argument("--json", default=None, help="also write the JSON object to this file")

    p = sub.add_parser("bench", help="decode speed of every strategy against transformers on the same weights",
                       description=cmd_bench.__doc__)
    add_model_args(p, compile=True)
    p.add_argument("--prompts", required=True, help="prompt file (one per line, or JSONL with a 'prompt' field)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes after the warm-up pass, each running every row on every prompt, the row "
                   "order rotated by one per prompt (default 3)")
    p.add_argument("--compare-module", dest="compare_modules", action="append", default=None, metavar="PATH",
                   help="another module for the same base (repeatable): its module rows are timed in the same "
                   "run, interleaved, named ROW@FILE_STEM, so two modules are compared side by side")
    p.add_argument("--strategies", nargs="+", default=None, metavar="ROW",
                   help="rows to run, among: standard alternating verified adaptive lookup hf-generate "
                   "hf-prompt-lookup (default: all; the module ones need --module); standard always runs")
    p.add_argument("--draft-lens", nargs="+", type=int, default=[1], help="verified: draft lengths (default 1)")
    p.add_argument("--draft-widths", nargs="+", type=int, default=[1],
                   help="verified: draft widths, one row per length and width (default 1; see --draft-width "
                   "of generate)")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.5],
                   help="adaptive: confidence thresholds in [0, 1] (default 0.5)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--plot", default=None, help="write a PNG of the speed ratios (needs matplotlib)")

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks, standard and alternating scoring (offline)",
                       description=cmd_lm_eval.__doc__)
    add_model_args(p, precision=True)
    add_device_arg(p)
    p.add_argument("--tasks-dir", default="benchmarks/tasks",
                   help="directory of task YAML configs and JSONL data (default benchmarks/tasks)")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: every config in --tasks-dir)")
    p.add_argument("--scoring", nargs="+", choices=["standard", "alternating"], default=None,
                   help="how continuations are scored (default: both with --module, else standard); "
                   "alternating needs --module")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
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
