"""The ``recyclegpt`` command. Thin: each command parses its options, builds its engine with
``recyclegpt.load`` where it needs one, calls one library function and prints the result.

A command lists the options it takes (``@command``) by their names in ``options.OPTIONS``, where each is
defined once with its one meaning.

Errors the user can fix (bad option, missing file, unknown model...) print one ``error:`` line and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from recyclegpt import load
from recyclegpt.bases.registry import REGISTRY
from recyclegpt.hardware import setup_cpu
from recyclegpt.options import DECODE, MODEL, SAMPLE, SCORE, TRAIN, JsonPath, add_options

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str, dict]] = {}


def command(help: str, options: str = "", **changes: dict) -> Callable:
    """Register ``cmd_NAME`` as the command NAME (dashes for underscores), with a one-line ``help`` and the
    ``options`` it takes, changed by ``changes`` (both as ``options.add_options`` reads them)."""

    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = (fn, help, options, changes)
        return fn

    return register


def load_from(args: argparse.Namespace):
    """``recyclegpt.load`` with the command's model options -> (engine, base)."""
    return load(args.model, getattr(args, "module", None), args.backend, getattr(args, "compile", False),
                getattr(args, "dtype", "float32"), getattr(args, "prepack", None), getattr(args, "quant", "none"),
                getattr(args, "device", "cpu"), with_base=True)


def decoding(args: argparse.Namespace) -> dict:
    """The strategy and sampling options as keywords of ``Engine.generate`` / ``Engine.stream``."""
    from recyclegpt.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    return dict(strategy=args.strategy, max_new_tokens=args.max_new_tokens, sampling=sampling,
                draft_len=args.draft_len, threshold=args.threshold, draft_width=args.draft_width,
                exit_layer=args.early_exit_layer)


def stream(engine, prompt: str, kw: dict) -> str:
    """Print a reply as it is generated, then its speed on stderr; returns the reply."""
    stats, reply = [], []
    for chunk in engine.stream(prompt, stats_out=stats, **kw):
        print(chunk, end="", flush=True)
        reply.append(chunk)
    print()
    speed(stats[0])
    return "".join(reply)


def speed(s) -> None:
    """One stderr line: new tokens, tokens per second and tokens per full-model call."""
    print(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.tau:.2f} tokens per full call]", file=sys.stderr)


def emit(result: dict | list, path: str | None = None, show: bool = True) -> int:
    """Print ``result`` as one JSON line (``show``) and write the line to ``path`` if given; returns 0, the exit
    status of a command that ends with it."""
    line = json.dumps(result)
    if path:
        Path(path).write_text(line + "\n")
    if show:
        print(line)
    return 0


def measured(args: argparse.Namespace, base, **result) -> dict:
    """A measured result (bench, eval, lm-eval) with the model options it ran with and the machine it ran on."""
    from recyclegpt import kernels
    from recyclegpt.hardware import measured_on, product_path

    products = product_path(base.prepack, args.quant, getattr(args, "compile", False), getattr(args, "device", "cpu"))
    if args.quant != "none":
        products += f"; {kernels.describe(build_now=True)}"
    return {"model": base.name, "module": args.module, "dtype": args.dtype, "prepack": base.prepack,
            "quant": args.quant, "products": products, **result, **measured_on()}


def compared(args: argparse.Namespace, base) -> dict:
    """The --compare-module files by name, loaded for ``base`` as the main module is (dtype, prepack, quant)."""
    from recyclegpt.bases import module_for

    return {p: module_for(base, p, args.dtype, quant=args.quant) for p in args.compare_modules or ()}


@command("parameter counts of a preset's backbone and module, and this CPU", "preset=smollm2-135m print-json json",
         json=dict(nargs="?", action=JsonPath))
def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a preset's backbone and module, this machine's CPU (model, vector features) and the
    products decoding uses on it by default."""
    from recyclegpt import kernels
    from recyclegpt.hardware import cpu_info, prepack_by_default, product_path
    from recyclegpt.recycle import preset_summary

    cpu = cpu_info()
    products = product_path(prepack_by_default(cpu))
    quantized = kernels.describe()
    info = {**preset_summary(args.preset), "cpu": cpu.record(), "products": products, "quantized": quantized}
    emit(info, args.json, show=args.print_json)
    if args.print_json:
        return 0
    m, r = info["model"], info["recycle"]
    print(f"preset {args.preset}: {info['description']}")
    print(f"  backbone: {info['backbone'] / 1e6:8.2f} M parameters ({info['logical_layers']} " + (
        f"logical layers over {info['unique_layers']} unique blocks" if info["unique_layers"] < info["logical_layers"]
        else "layers") + f", d {m['d_model']})")
    print(f"  module:   {info['module'] / 1e6:8.2f} M parameters ({r['n_layers']} layers + fuse "
          f"{2 * m['d_model']}->{m['d_model']}; embedding and head shared)")
    print(f"  module share: {100 * info['module_share']:.1f}% of the backbone\ncpu: {cpu.describe()}")
    print(f"products (float32 and bfloat16, native backend, by default): {products}")
    print(f"products with --quant int8 / int4: {quantized}")
    return 0


@command("list the known base models")
def cmd_bases(args: argparse.Namespace) -> int:
    """List the known base models."""
    for spec in REGISTRY.values():
        print(f"{spec.name:14s} {spec.description}  [install: {spec.install}]")
    return 0


@command("generate text from a prompt", f"{SAMPLE} prompt! raw stop stream print-json json",
         json=dict(nargs="?", action=JsonPath))
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a prompt (with a chat base, inside its chat template unless --raw)."""
    setup_cpu(args.threads)
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give some text with --prompt")
    engine, base = load_from(args)
    prompt = args.prompt
    if base.chat and not args.raw:
        prompt = base.tokenizer.apply_chat([{"role": "user", "content": prompt}])
    kw = {**decoding(args), "stop": args.stop or ()}
    if args.stream and not (args.print_json or args.json):
        stream(engine, prompt, kw)
        return 0
    g = engine.generate([prompt], **kw)[0]
    emit({"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason, "strategy": args.strategy,
          "stats": g.stats.to_dict()}, args.json, show=args.print_json)
    if not args.print_json:
        print(g.text)
        speed(g.stats)
    return 0


@command("prepare training data", "action inputs out! model backend dtype prepack device threads val-fraction "
         "prompts limit max-new-tokens batch-size=16 n seed=0 exclude")
def cmd_data(args: argparse.Namespace) -> int:
    """Prepare training data: tokenize text files, sample prompts from a chat base, distill its own greedy
    answers to prompts, merge directories, or split corpus files into their held-in (training) and held-out
    (evaluation) parts. The base options and --exclude (prompts kept out with their near-duplicates: equal
    ignoring case, punctuation and spacing, or sharing 80 % of their word trigrams) apply to prompts and distill."""
    from recyclegpt import data, workflows
    from recyclegpt.bases import load_base

    setup_cpu(args.threads)
    for flag, on in (("--dtype", args.dtype != "float32"), ("--prepack", args.prepack),
                     ("--device", args.device != "cpu"), ("--exclude", args.exclude)):
        if on and args.action in ("prepare", "merge", "split"):
            raise ValueError(f"{flag} applies to data distill and data prompts only; data {args.action} runs no "
                             "model and reads no prompts")
    if args.action == "split":
        return emit(data.split_corpora(args.inputs, args.out))
    if args.action == "merge":
        return emit(data.merge(args.inputs, args.out)["tokens"])
    if args.action == "prepare":
        base = load_base(args.model, backend=args.backend)
        return emit(data.prepare(args.inputs, base.tokenizer, args.out, args.val_fraction, base.name)["tokens"])
    excluded = [q for path in args.exclude for q in data.read_prompts(path)]  # bad files fail before the base loads
    if args.action == "prompts":
        return emit(workflows.self_prompts(load_from(args)[0], args.n, args.out, args.batch_size, seed=args.seed,
                                           exclude=excluded))
    if not args.prompts:
        raise ValueError("data distill needs --prompts FILE: the prompts whose greedy answers it stores")
    prompts, dropped = data.exclude_prompts(data.read_prompts(args.prompts), excluded)
    if dropped:
        print(f"--exclude: dropped {dropped} of the prompts in {args.prompts}", file=sys.stderr)
    engine, base = load_from(args)
    return emit(workflows.distill(engine, prompts[: args.limit or None], args.out, args.max_new_tokens,
                                  args.batch_size, args.val_fraction, base.chat, base.name)["tokens"])


@command("train a RecycleGPT from scratch (joint loss)",
         f"preset=small recycle-weight early-exit-weight early-exit-layer {TRAIN} lr=6e-4")
def cmd_train(args: argparse.Namespace) -> int:
    """Train a RecycleGPT from scratch with the joint loss (lambda 0 = a plain GPT baseline), optionally with an
    early-exit loss (SPEED)."""
    return train(args, "joint", preset=args.preset, recycle_weight=args.recycle_weight)


@command("train a module for a frozen pretrained base", f"model backend ce-weight feature-weight draft-vocab init "
         f"hidden-cache {TRAIN} lr=1e-3")
def cmd_attach(args: argparse.Namespace) -> int:
    """Train a recyclable module on a frozen pretrained base (distillation to its next-step distribution)."""
    return train(args, "attach", base=args.model, backend=args.backend, draft_vocab=args.draft_vocab, init=args.init)


def train(args: argparse.Namespace, mode: str, **model) -> int:
    """train and attach: the ``TrainConfig`` from the options, then ``train.run_training``."""
    from recyclegpt.config import TrainConfig
    from recyclegpt.train import run_training

    setup_cpu(args.threads)
    cfg = TrainConfig(
        mode=mode, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, min_lr=args.lr * 0.1, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=1.0,
        ce_weight=getattr(args, "ce_weight", 0.0), feature_weight=getattr(args, "feature_weight", 0.0),
        bf16=args.dtype == "bfloat16", eval_every=args.eval_every, eval_batches=args.eval_batches,
        ckpt_every=args.ckpt_every, seed=args.seed, early_exit_weight=getattr(args, "early_exit_weight", 0.0),
        early_exit_layer=getattr(args, "early_exit_layer", None),
    )
    return emit(run_training(cfg, args.data, args.out, getattr(args, "hidden_cache", None), args.resume,
                             module_layers=args.module_layers, device=args.device, **model))


@command("restrict a trained module's proposals to the most frequent tokens", "module! data! size out!")
def cmd_draft_vocab(args: argparse.Namespace) -> int:
    """Give a trained module a draft vocabulary: the N most frequent tokens of prepared data. The module
    then proposes only those tokens, so each module step reads N rows of the head instead of all of them
    (verified decoding stays exact); prints the share of the data's tokens the vocabulary covers."""
    from recyclegpt.checkpoint import set_draft_vocab_file

    return emit(set_draft_vocab_file(args.module, args.data, args.size, args.out))


@command("fit a module's in-context copy gate and save the module with it", f"{MODEL} device prompts! text "
         "max-new-tokens text-tokens seq-len=512 batch-size=8 out!", text=dict(nargs="*", default=[]))
def cmd_copy_gate(args: argparse.Namespace) -> int:
    """Teach a trained module to copy from the context: fit the gate that mixes a token copied from an
    earlier occurrence of the current n-gram into the module's proposals (recyclegpt/copy_gate.py), on the
    base's greedy answers to --prompts (use prompts no evaluation uses) and on --text (e.g. held-in corpus
    text), then save the module with it. Decoding and evaluation use the mixture from then on; verified
    decoding stays exact."""
    from recyclegpt.data import read_prompts
    from recyclegpt.workflows import copy_gate_file

    setup_cpu(args.threads)
    if args.module is None:
        raise ValueError("copy-gate needs the module to fit: pass --module PATH (or 'default')")
    prompts = read_prompts(args.prompts)
    engine, base = load_from(args)
    return emit(copy_gate_file(engine, base.name, args.module, prompts, args.out, args.text, chat=base.chat,
                               max_new_tokens=args.max_new_tokens, text_tokens=args.text_tokens,
                               seq_len=args.seq_len, batch_size=args.batch_size))


@command("average the weights of a module and its fine-tunes (a model soup)", "modules weights model out!")
def cmd_average(args: argparse.Namespace) -> int:
    """Average the weights of modules trained for one base (--model), e.g. a module and its fine-tunes made
    with `attach --init` (a model soup: the average often predicts better than any one of them). The copy
    gates are dropped; refit the average's with copy-gate."""
    from recyclegpt.checkpoint import average_module_files

    return emit(average_module_files(args.modules, args.out, args.weights, args.model))


@command("chat in the terminal, replies streamed with their speed", f"{SAMPLE} system")
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat in the terminal: each line you type gets a streamed reply; /exit or end of input quits."""
    from recyclegpt.bases.tokenizer import trim_chat
    from recyclegpt.strategies import make_strategy

    setup_cpu(args.threads)
    engine, _ = load_from(args)
    if make_strategy(args.strategy, args.draft_len, args.threshold, args.draft_width,
                     exit_layer=args.early_exit_layer).uses_module \
            and engine.module is None:
        raise ValueError(f"strategy {args.strategy!r} needs a recyclable module; pass --module PATH")
    kw, limit = decoding(args), engine.backbone.config.max_seq_len
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
        prompt = trim_chat(engine.tokenizer, system, history, args.max_new_tokens, limit)
        if prompt is None:
            history.pop()
            print(f"error: this message and --max-new-tokens {args.max_new_tokens} do not fit the context of "
                  f"{limit} tokens", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": stream(engine, prompt, kw)})


@command("serve an OpenAI-compatible HTTP API", f"{DECODE} host port api-key served-model-name max-batch max-waiting")
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, streaming)."""
    import uvicorn

    from recyclegpt.server import create_app

    setup_cpu(args.threads)
    engine, base = load_from(args)
    app = create_app(
        engine, args.served_model_name or base.name, default_strategy=args.strategy,
        api_key=args.api_key or os.environ.get("RECYCLEGPT_API_KEY"),
        chat=base.chat or bool(base.tokenizer.chat_template), draft_len=args.draft_len, threshold=args.threshold,
        draft_width=args.draft_width, exit_layer=args.early_exit_layer, max_batch=args.max_batch,
        max_waiting=args.max_waiting,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


@command("run the main job on the embedded default base and module", "threads max-new-tokens=96")
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: SmolLM2-135M with the shipped module, every strategy."""
    from recyclegpt.demo import run_demo

    return run_demo(threads=args.threads, max_new_tokens=args.max_new_tokens)


@command("perplexity (base / alternating), module agreement, tau: one JSON object", f"{SCORE} text prompts answers "
         "compare-module max-tokens seq-len=512 batch-size=2 max-new-tokens draft-len=1 draft-width=1 json",
         text=dict(nargs=None, metavar="FILE"))
def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of the base and under the alternating scheme and module agreement on --text, agreement and
    tau / acceptance of verified decoding on the base's answers to --prompts, agreement on stored --answers
    (paired with each --compare-module): one JSON object (definitions: recyclegpt/evaluate.py)."""
    from recyclegpt.data import open_distilled, read_prompts
    from recyclegpt.evaluate import check_request, evaluate

    setup_cpu(args.threads)
    check_request(args.module is not None, args.text, args.prompts, args.answers, args.compare_modules)
    prompts = read_prompts(args.prompts) if args.prompts else None
    stored = open_distilled(args.answers) if args.answers else None  # a bad directory fails before the base loads
    engine, base = load_from(args)
    result = evaluate(engine, args.text, prompts, args.max_tokens, args.seq_len, args.batch_size, args.max_new_tokens,
                      base.chat, args.draft_len, args.draft_width, stored, compared(args, base))
    return emit(measured(args, base, **result), args.json)


@command("decode speed of every strategy against transformers on the same weights", f"{MODEL} compile dtype "
         "prepack quant prompts! max-new-tokens repeats compare-module strategies draft-lens draft-widths "
         "thresholds early-exit-layer json plot")
def cmd_bench(args: argparse.Namespace) -> int:
    """Decode speed of every strategy and of transformers' generate (greedy, prompt lookup) on the same
    weights and prompts: a table, then one JSON line (see recyclegpt/bench.py for the timing rules). Rows
    are interleaved and their order rotates from pass to pass; tok/s divides each row's own new tokens
    (shown beside it), and the JSON keeps every timed run's seconds, tokens and tok/s per row."""
    from recyclegpt import bench
    from recyclegpt.data import read_prompts

    setup_cpu(args.threads)
    prompts = read_prompts(args.prompts)
    engine, base = load_from(args)
    result = bench.benchmark(engine, base, prompts, args.strategies, args.max_new_tokens, args.repeats,
                             args.draft_lens, args.draft_widths, args.thresholds, compared(args, base),
                             progress=True, exit_layer=args.early_exit_layer)
    result = measured(args, base, compare_modules=args.compare_modules or [], max_new_tokens=args.max_new_tokens,
                      compile=args.compile, **result)
    print(bench.format_table(result))
    emit(result, args.json)
    if args.plot:
        bench.plot(result, args.plot)
    return 0


@command("lm-evaluation-harness tasks, standard and alternating scoring (offline)", f"{SCORE} tasks-dir tasks "
         "scoring limit batch-size=4 json")
def cmd_lm_eval(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness tasks offline (by default the local ones in benchmarks/tasks), with
    standard and/or alternating scoring, compared item by item (see recyclegpt/lm_eval_adapter.py)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only; read when datasets is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from recyclegpt.lm_eval_adapter import format_scores, score_tasks
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}); install it with: pip install 'recyclegpt[eval]'") from None

    setup_cpu(args.threads)
    engine, base = load_from(args)
    scores = score_tasks(engine, args.tasks_dir, args.tasks, args.scoring, args.limit, args.batch_size)
    print(format_scores(scores), file=sys.stderr)
    return emit(measured(args, base, limit=args.limit, **scores), args.json)


def build_parser() -> argparse.ArgumentParser:
    """The ``recyclegpt`` parser: a subcommand per ``@command``, its docstring as the description."""
    parser = argparse.ArgumentParser(
        prog="recyclegpt", description="RecycleGPT: faster decoding by recycling the hidden state a language "
        "model already computed. Every command has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help, options, changes) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help, description=fn.__doc__), options, changes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recyclegpt`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except (ValueError, FileNotFoundError) as exc:  # our error types all derive from ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
