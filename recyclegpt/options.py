"""The command line's vocabulary: every option of ``recyclegpt`` with its one meaning, the old spellings
kept for a release, and how a command's parser gets its options (``add_options``).

A command lists the options it takes by name (``cli.command``); where it needs another default it sets only
that, so a name means the same thing in every command: ``--model`` is always the base, ``--dtype`` its
precision, ``--json PATH`` a file the JSON result is written to, ``--compare-module`` repeatable. Old spellings
(``--base``, ``--bf16``, eval's ``--data``, the bare ``--json`` flag of info and generate) still parse, hidden
from --help, and print a one-line deprecation note naming the new spelling.
"""

from __future__ import annotations

import argparse
import sys

from recyclegpt.bases.registry import DEFAULT_BASE, DTYPES, QUANTS, REGISTRY
from recyclegpt.config import PRESETS
from recyclegpt.strategies import STRATEGIES

PROMPT_FILE = "one prompt per line, or JSONL with a 'prompt' field"

# Every option with its one meaning: name -> argparse keywords (names without "--" are positional).
OPTIONS: dict[str, dict] = {
    # the base, its module and how they run
    "model": dict(default=DEFAULT_BASE, help=f"the base: registry name ({', '.join(REGISTRY)}), Hugging Face "
                  "checkpoint directory, .gguf file, or the run directory of a `recyclegpt train` run "
                  "(default %(default)s)"),
    "backend": dict(default="auto", choices=["auto", "native", "hf"],
                    help="native: converted into RecycleGPT's own model (fast path, Llama/Mistral/Qwen2); "
                    "hf: any transformers causal LM; auto: native when possible (default)"),
    "module": dict(help="recyclable module file (.safetensors; a training run writes RUN/module.safetensors); "
                   "'default' = the module shipped for the base; needed by every strategy but standard and lookup"),
    "compare-module": dict(dest="compare_modules", action="append", metavar="PATH",
                           help="another module for the same base, measured beside --module in the same run "
                           "(repeatable). eval (with --answers): its agreement on the same answer slots, the paired "
                           "difference (it - --module) with a 95%% bootstrap interval and the slots only one of the "
                           "two gets right, the base running once for all; bench: its module rows, interleaved, "
                           "named ROW@FILE_STEM"),
    "threads": dict(type=int, help="torch CPU threads (default: torch's choice)"),
    "device": dict(default="cpu", help="where the model runs: cpu (default), cuda or cuda:N; under torchrun, "
                   "cuda is each process's own GPU (LOCAL_RANK)"),
    "compile": dict(action="store_true", help="decode through torch.compile (native backend; needs a C++ "
                    "compiler): the first requests compile for tens of seconds, later steps run faster"),
    "dtype": dict(default="float32", choices=list(DTYPES),
                  help="precision of base and module (default float32); bfloat16 is faster only with native "
                  "bfloat16 products, and verified is then exact only up to rounding (docs/decoding.md); "
                  "data: the base's answers then follow the bfloat16 model; train, attach: bfloat16 autocast"),
    "prepack": dict(action=argparse.BooleanOptionalAction, default=None,
                    help="multiply through oneDNN with the weights packed once (native backend, CPU, eager; a second "
                    "copy of the weights; float32 results unchanged). Default: on for AMD CPUs, where it is the "
                    "fastest exact path, off elsewhere (recyclegpt info shows the choice; docs/decoding.md)"),
    "quant": dict(default="none", choices=list(QUANTS),
                  help="weight-only quantized products for base and module: int8 (a scale per 32 weights) or "
                  "int4 (groups of 32; the head in int8), 4-7x fewer bytes per step, through kernels compiled with "
                  "g++ on first use (about 15 s; PyTorch's own without a compiler); verified stays exact against "
                  "standard decoding of the same quantized model (default none; native backend)"),
    # decoding
    "strategy": dict(default="standard", choices=list(STRATEGIES),
                     help="standard: plain decoding; alternating: the paper's full/module alternation (lossy); "
                     "verified: module drafts checked by the full model (lossless); adaptive: use the module's "
                     "token only when it is confident; lookup: drafts copied from the context (prompt lookup) "
                     "checked by the full model (lossless, no module); speed: SPEED's pipelined speculation from an "
                     "early exit (lossless, no module; pays on parameter-shared models; docs/decoding.md)"),
    "draft-len": dict(type=int, help="drafts per full call: verified (default 1), lookup (default 10)"),
    "draft-width": dict(type=int, help="verified: candidates for the first draft's slot checked in the same full "
                        "call (default 1); speed: tokens speculated per call (default 3); native backend; "
                        "docs/decoding.md"),
    "threshold": dict(type=float, default=0.5,
                      help="adaptive: module probability needed to use its token, in [0, 1] (default 0.5)"),
    "max-new-tokens": dict(type=int, default=128, help="tokens to generate per answer at most (default %(default)s)"),
    "temperature": dict(type=float, default=0.0, help="0 = greedy (default); > 0 samples"),
    "top-p": dict(type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)"),
    "top-k": dict(type=int, default=0, help="keep the k most likely tokens; 0 = off (default)"),
    "repetition-penalty": dict(type=float, default=1.0, help="1 = off (default)"),
    "seed": dict(type=int, help="random seed, same seed same result: of sampling, or (train, attach) of the data "
                 "order and initialisation (default %(default)s)"),
    "prompt": dict(help="the prompt text"),
    "raw": dict(action="store_true", help="feed the prompt as is, without the chat template"),
    "stop": dict(action="append", help="a string that ends generation (repeatable)"),
    "stream": dict(action="store_true", help="print text as it is generated (not with --print-json or --json)"),
    "system": dict(help="a system message that opens the conversation"),
    # files in and out
    "prompts": dict(help=f"prompt file ({PROMPT_FILE})"),
    "text": dict(nargs="+", metavar="FILE", help="text file(s) (.txt .md .rst .jsonl .parquet)"),
    "data": dict(help="prepared data directory (recyclegpt data prepare / distill)"),
    "out": dict(help="where the result is written: a directory (data; train, attach: the run directory with "
                "checkpoint.pt, module.safetensors, log.jsonl), or a file (data prompts: JSONL; draft-vocab, "
                "copy-gate, average: a module file, which may equal --module)"),
    "json": dict(metavar="PATH", help="also write the JSON result, as one line, to PATH"),
    "print-json": dict(action="store_true", help="print the result as one JSON object instead of text"),
    "plot": dict(help="write a PNG of the speed ratios (needs matplotlib)"),
    "batch-size": dict(type=int, help="sequences (prompts, windows) processed together; train, attach: per step, "
                       "over all processes (default %(default)s)"),
    "seq-len": dict(type=int, help="window length in tokens (default %(default)s)"),
    "limit": dict(type=int, help="use only the first N items: data distill: prompts; lm-eval: items per task "
                  "(default: all)"),
    # data
    "action": dict(choices=["prepare", "prompts", "distill", "merge", "split"],
                   help="prepare: tokenize text files; prompts: sample user prompts from a chat model itself "
                   "(JSONL at --out); distill: the base's own greedy answers to --prompts; merge: concatenate "
                   "prepared directories; split: write corpus files' first 90 %% of lines to OUT/heldin and "
                   "the held-out last 10 %% to OUT/heldout"),
    "inputs": dict(nargs="*", help="prepare: text files (.txt .md .rst .jsonl .parquet); merge: prepared "
                   "directories; split: corpus files (scripts/fetch_corpora.py)"),
    "val-fraction": dict(type=float, default=0.01, help="share held out for validation (default %(default)s)"),
    "n": dict(type=int, default=1000, help="data prompts: how many to keep (default 1000)"),
    "exclude": dict(nargs="+", default=[], metavar="FILE",
                    help=f"prompt files ({PROMPT_FILE}) whose prompts are kept out, with their near-duplicates "
                    "(equal ignoring case, punctuation and spacing, or sharing 80 %% of their word trigrams): "
                    "benchmark and held-out prompts"),
    # training
    "preset": dict(choices=list(PRESETS), help="model shape (default %(default)s)"),
    "recycle-weight": dict(type=float, default=1.0,
                           help="lambda of the recycle loss (default 1; 0 trains a plain GPT baseline)"),
    "early-exit-weight": dict(type=float, default=0.0,
                              help="weight of a next-token loss read after --early-exit-layer logical layers through "
                              "the model's own norm and head (SPEED's early-layer speculation; default 0: off)"),
    "early-exit-layer": dict(type=int, help="the early exit: the logical layer the early-exit loss reads (train; 1 .. "
                             "the model's depth), or strategy speed speculates from (1 .. depth - 1; default: after "
                             "the unique blocks of a parameter-shared model, else half the depth)"),
    "module-layers": dict(type=int, help="module depth (default: the preset's; attach: 1, or the --init module's)"),
    "steps": dict(type=int, default=1000, help="optimiser steps (default 1000)"),
    "grad-accum": dict(type=int, default=1, help="micro-batches per step (default 1)"),
    "lr": dict(type=float, help="peak learning rate (default %(default)s); cosine to lr/10"),
    "warmup": dict(type=int, default=50, help="linear warm-up steps (default 50)"),
    "weight-decay": dict(type=float, default=0.1, help="AdamW weight decay (default 0.1)"),
    "eval-every": dict(type=int, default=100, help="validation every N steps (default 100)"),
    "eval-batches": dict(type=int, default=8, help="validation batches (default 8)"),
    "ckpt-every": dict(type=int, default=100, help="checkpoint every N steps (default 100)"),
    "resume": dict(action="store_true", help="continue from OUT/checkpoint.pt"),
    "ce-weight": dict(type=float, default=0.0,
                      help="weight of the text-token cross-entropy added to the KL (default 0)"),
    "feature-weight": dict(type=float, default=0.0, help="weight of a SmoothL1 regression of the module's state "
                           "onto the base's next final hidden state, added to the KL (default 0)"),
    "draft-vocab": dict(type=int, default=8192, help="the module proposes only the N most frequent tokens of the "
                        "training data, which makes each module step cheaper (the head is the largest matrix); "
                        "0 = the whole vocabulary (default 8192; with --init, the module's own)"),
    "init": dict(metavar="MODULE", help="fine-tune a trained module (.safetensors, or 'default' for the one "
                 "shipped for the base) instead of a new one: its depth and draft vocabulary are kept, its copy "
                 "gate is dropped (refit it with copy-gate)"),
    "hidden-cache": dict(metavar="DIR", help="compute the frozen base's hidden states over the data's windows "
                         "once, store them in DIR (bfloat16, one per token) and train from them: each step then "
                         "costs the module alone; reused when DIR holds a cache for the same base, data and "
                         "--seq-len"),
    "size": dict(type=int, default=8192, help="draft vocabulary size (default 8192)"),
    "text-tokens": dict(type=int, default=8192, help="tokens read from each --text file (default 8192)"),
    "modules": dict(nargs="+", metavar="MODULE",
                    help="two or more module files of one base ('default' = the base's shipped module)"),
    "weights": dict(type=float, nargs="+", metavar="W",
                    help="one weight per module, normalised to sum 1 (default: equal)"),
    # serving
    "host": dict(default="127.0.0.1",
                 help="address to listen on (default 127.0.0.1; 0.0.0.0 listens on every interface)"),
    "port": dict(type=int, default=8000, help="port to listen on (default 8000)"),
    "api-key": dict(help="require 'Authorization: Bearer KEY' on /v1 requests (default: $RECYCLEGPT_API_KEY; none "
                    "if unset)"),
    "served-model-name": dict(help="the model name clients must send (default: the name given to --model)"),
    "max-batch": dict(type=int, default=None, help="the most prompts decoded together; requests join and leave the "
                      "running batch between cycles (default 8; 1: one at a time; above 1 needs the native backend)"),
    "max-waiting": dict(type=int, default=64, help="the most prompts waiting for a place; more get 503 (default 64)"),
    # measuring
    "answers": dict(metavar="DIR", help="a `data distill` output made with this base: agreement on its stored "
                    "greedy answers, scored without decoding them again, with a 95%% bootstrap interval; use "
                    "prompts the module never trained on"),
    "max-tokens": dict(type=int, default=20000, help="tokens of --text to score (default 20000)"),
    "repeats": dict(type=int, default=3, help="timed passes after the warm-up pass, each running every row on "
                    "every prompt, the row order rotated by one per prompt (default 3)"),
    "strategies": dict(nargs="+", metavar="ROW", help="rows to run, among: standard alternating verified adaptive "
                       "lookup speed hf-generate hf-prompt-lookup llama-cpp-q4_0 llama-cpp-q8_0 (default: all; the "
                       "module ones need --module, the llama-cpp ones llama-cpp-python); standard always runs"),
    "draft-lens": dict(type=int, nargs="+", default=[1], help="verified: draft lengths (default 1)"),
    "draft-widths": dict(type=int, nargs="+", help="verified: draft widths, one row per length and width (default "
                         "1); speed: one row per width (default 3); see --draft-width of generate"),
    "thresholds": dict(type=float, nargs="+", default=[0.5],
                       help="adaptive: confidence thresholds in [0, 1] (default 0.5)"),
    "tasks-dir": dict(default="benchmarks/tasks",
                      help="directory of task YAML configs and JSONL data (default benchmarks/tasks)"),
    "tasks": dict(nargs="+", help="task names (default: every config in --tasks-dir)"),
    "scoring": dict(nargs="+", choices=["standard", "alternating"], help="how continuations are scored (default: "
                    "both with --module, else standard); alternating needs --module"),
}
POSITIONAL = ("action", "inputs", "modules")
# Old spellings kept for one release: new name -> (old option, the value it sets, or None: its own argument).
ALIASES = {"model": ("--base", None), "dtype": ("--bf16", "bfloat16"), "text": ("--data", None)}
DEPRECATED = "recyclegpt: {} is deprecated and will be removed in the next release; use {}"
# Groups of options several commands take.
MODEL = "model backend module threads"
DECODE = f"{MODEL} compile dtype prepack quant strategy draft-len draft-width threshold early-exit-layer"
SAMPLE = f"{DECODE} max-new-tokens temperature top-p top-k repetition-penalty seed"
SCORE = f"{MODEL} dtype prepack quant device"
TRAIN = ("data! out! module-layers steps batch-size=8 grad-accum seq-len=256 warmup weight-decay dtype "
         "eval-every eval-batches ckpt-every seed=0 resume threads device")


class Renamed(argparse.Action):
    """An old option name: hidden from --help, it sets the new option (to ``const`` for a flag) and prints a
    one-line deprecation note naming ``new``."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(DEPRECATED.format(option_string, self.new), file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class JsonPath(argparse.Action):
    """``--json PATH``; a bare ``--json`` (the old flag of info and generate) means ``--print-json``, with a note."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:
            print(DEPRECATED.format("--json without a path", "--print-json"), file=sys.stderr)
            namespace.print_json = True
        else:
            namespace.json = values


def add_options(p: argparse.ArgumentParser, options: str, changes: dict[str, dict] | None = None) -> None:
    """Add options to a command's parser, each with its old spelling (hidden) where it has one.

    Args:
        p: the command's parser.
        options: names from ``OPTIONS``, separated by spaces, each as ``name``, ``name!`` (required) or
            ``name=DEFAULT`` (this command's default, read with the option's type).
        changes: argparse keywords that differ for this command, by option name (dashes as underscores).
    """
    for token in options.split():
        spec, _, default = token.partition("=")
        name = spec.removesuffix("!")
        kw = {**OPTIONS[name], **(changes or {}).get(name.replace("-", "_"), {})}
        if default:
            kw["default"] = kw.get("type", str)(default)
        if spec.endswith("!"):
            kw["required"] = True
        p.add_argument(name if name in POSITIONAL else f"--{name}", **kw)
        if name in ALIASES:
            old, value = ALIASES[name]
            p.add_argument(old, dest=kw.get("dest", name), action=Renamed, nargs=0 if value else kw.get("nargs"),
                           const=value, new=f"--{name}{f' {value}' if value else ''}")
