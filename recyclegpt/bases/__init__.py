"""Pretrained bases: registry names, Hugging Face directories or GGUF files -> backbone + tokenizer.

The first use converts the weights once into ``$RECYCLEGPT_HOME/bases/<key>/`` (a native
safetensors backbone, or a transformers directory for the generic path) with the tokenizer beside it;
later loads read that cache and take seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recyclegpt import kernels
from recyclegpt.bases.convert import NATIVE_ARCHITECTURES, UnsupportedArchitecture, backbone_from_hf
from recyclegpt.bases.hf import HFBackbone
from recyclegpt.bases.registry import DEFAULT_BASE, DTYPES, QUANTS, REGISTRY, BaseError, BaseSpec, home, resolve
from recyclegpt.bases.tokenizer import ByteTokenizer, HFTokenizer
from recyclegpt.checkpoint import load_backbone, save_backbone
from recyclegpt.hardware import prepack_by_default
from recyclegpt.model import Backbone, fuse_projections, prepack_linears
from recyclegpt.quant import quantize_linears

__all__ = [
    "DEFAULT_BASE", "REGISTRY", "Base", "BaseError", "ByteTokenizer", "HFTokenizer", "UnsupportedArchitecture",
    "decoding_base", "load_base", "module_for", "resolve_device",
]

BACKENDS = ("auto", "native", "hf")


@dataclass
class Base:
    """A loaded base: backbone (native or generic), tokenizer and how it was found."""

    name: str
    backbone: torch.nn.Module
    tokenizer: HFTokenizer
    backend: str
    chat: bool
    prepack: bool = False  # its products go through oneDNN with packed weights (``decoding_base``)


def _cache_key(spec: BaseSpec | None, path: Path) -> str:
    if spec is not None:
        return spec.name
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def read_hf(path: Path):
    """Load a transformers model + tokenizer from a GGUF file or checkpoint directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaseError(f"cannot read model from {path} (missing, corrupt or unsupported file?): {first}") from None
    return model, tok


def _convert(spec: BaseSpec | None, path: Path, backend: str, target: Path) -> None:
    """Read the source once and write the cache directory ``target`` atomically."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with tqdm(total=3, desc=f"converting {path.name} (first use only)", unit="step") as bar:
            model, tok = read_hf(path)
            bar.update()
            arch = getattr(model.config, "model_type", "?")
            if backend == "auto":
                backend = "native" if arch in NATIVE_ARCHITECTURES else "hf"
            if backend == "native":
                save_backbone(tmp / "backbone.safetensors", backbone_from_hf(model), {"source": str(path)})
            else:
                # A GGUF-loaded model is already dequantized; without both resets save_pretrained refuses,
                # or the saved config re-attaches the GGUF quantizer on reload.
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(tmp / "hf")
            bar.update()
            tok.save_pretrained(tmp / "tokenizer")
            (tmp / "backend").write_text(backend)
            bar.update()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _cached(model: str, backend: str) -> tuple[BaseSpec | None, Path, Path, str]:
    """Resolve ``model``, converting it into the cache on first use: (spec or None, source, cache dir, backend)."""
    spec, path = resolve(model)
    wanted = spec.backend if (spec is not None and backend == "auto") else backend
    target = home() / "bases" / _cache_key(spec, path)
    cached = (target / "backend").read_text().strip() if (target / "backend").is_file() else None
    if cached is None or (wanted != "auto" and cached != wanted):
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(spec, path, wanted, target)
        cached = (target / "backend").read_text().strip()
    return spec, path, target, cached


def _tokenizer(spec: BaseSpec | None, target: Path) -> HFTokenizer:
    from transformers import AutoTokenizer

    stop = spec.stop_tokens if spec is not None else ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")
    return HFTokenizer(AutoTokenizer.from_pretrained(target / "tokenizer"), stop)


def trained_model_file(model: str) -> Path | None:
    """The weights of a RecycleGPT trained from scratch (``recyclegpt train``) when ``model`` names its
    run directory or its ``model.safetensors``; None when ``model`` is something else (a Hugging Face
    directory also holds a ``model.safetensors``, but with its ``config.json``)."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / "config.json").is_file():
        return path / "model.safetensors"
    return path if path.suffix == ".safetensors" else None


def _load_trained(file: Path, max_seq_len: int | None, chat: bool | None) -> Base:
    from recyclegpt.checkpoint import load_model

    model, identity = load_model(file, max_seq_len)
    if not identity.get("tokenizer"):
        raise BaseError(f"{file} does not record the tokenizer of its training data; retrain with `recyclegpt train`")
    spec, _, target, _ = _cached(identity["tokenizer"], "auto")
    name = str(file.parent if file.name == "model.safetensors" else file)
    return Base(name, model.backbone, _tokenizer(spec, target), "native", bool(chat))


def load_base(
    model: str = DEFAULT_BASE, backend: str = "auto", max_seq_len: int | None = None, chat: bool | None = None
) -> Base:
    """Load a base model by registry name, Hugging Face directory, GGUF file or trained RecycleGPT.

    Args:
        model: ``smollm2-135m``, ``gemma3-270m``, a checkpoint directory, a ``.gguf`` path, or a
            ``recyclegpt train`` run directory / its ``model.safetensors`` (native; the tokenizer is the
            one its data was prepared with).
        backend: ``native`` (Llama/Mistral/Qwen2 converted into the project's model, the fast path),
            ``hf`` (any transformers causal LM) or ``auto`` (native when the architecture allows).
        max_seq_len: context to allocate for; defaults to the model's (native caches preallocate it).
        chat: apply the chat template to prompts; default from the registry (False for paths).

    Raises:
        BaseError: unknown name, missing/corrupt file, or a backend that does not fit.
        CheckpointError: a trained model file that is missing or corrupt.
    """
    if backend not in BACKENDS:
        raise BaseError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    trained = trained_model_file(model)
    if trained is not None:
        if backend == "hf":
            raise BaseError(f"{model} is a RecycleGPT trained from scratch: it runs on the native backend only")
        return _load_trained(trained, max_seq_len, chat)
    spec, path, target, cached = _cached(model, backend)
    if cached == "native":
        backbone = load_backbone(target / "backbone.safetensors", max_seq_len=max_seq_len)
    else:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(target / "hf", dtype=torch.float32)
        backbone = HFBackbone(hf_model, max_seq_len)
    use_chat = chat if chat is not None else (spec.chat if spec is not None else False)
    return Base(spec.name if spec else str(path), backbone, _tokenizer(spec, target), cached, use_chat)


def resolve_device(name: str) -> torch.device:
    """The torch device a ``--device`` option names: ``cpu``, ``cuda`` or ``cuda:N``. Under ``torchrun``,
    ``cuda`` means this process's own GPU (``LOCAL_RANK``), so every rank trains on a different one.

    Raises:
        BaseError: an unknown device, or a GPU this machine (or this torch build) does not have.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise BaseError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise BaseError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BaseError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU on this machine "
                        f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    if dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BaseError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0")
    return dev


def decoding_base(
    model: str = DEFAULT_BASE, backend: str = "auto", compile: bool = False, dtype: str = "float32",
    prepack: bool | None = None, device: str = "cpu", quant: str = "none",
) -> Base:
    """A base ready to decode with these options: loaded (``load_base``), moved to ``device``, cast to
    ``dtype``, and packed (``prepack``) or quantized (``quant``); ``recyclegpt.load`` builds the engine on it.
    ``prepack`` None packs where that is this CPU's fastest exact path (``hardware.prepack_by_default``) and
    the options allow it (native backbone, CPU, eager, no quant); ``base.prepack`` says what was chosen.

    The options are checked before anything loads. Arguments as ``recyclegpt.load``'s.

    Raises:
        BaseError: an unknown dtype, device or quant, or prepack / quant with compile, a GPU or a
            non-native backbone, or quant with prepack or bfloat16.
    """
    if dtype not in DTYPES:
        raise BaseError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant not in QUANTS:
        raise BaseError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    packs = [name for name, on in (("prepack", prepack), ("quant", quant != "none")) if on]
    if len(packs) == 2:
        raise BaseError("prepack and quant both replace the products; choose one (quant reads 4-8x fewer bytes)")
    if quant != "none" and dtype != "float32":
        raise BaseError(f"quant keeps float32 activations (bfloat16 only at the products' inputs); leave out "
                        f"--dtype {dtype}")
    if packs and compile:
        raise BaseError(f"{packs[0]} is for eager decoding (torch.compile lays out weights its own way); "
                        f"choose one of {packs[0]} and compile")
    dev = resolve_device(device)
    if packs and dev.type != "cpu":
        raise BaseError(f"{packs[0]} lays out weights for CPU kernels; leave it out with --device {device}")
    base = load_base(model, backend=backend)
    if packs and not isinstance(base.backbone, Backbone):
        raise BaseError(f"{packs[0]} needs the native backend; {base.name} runs on the {base.backend} one")
    if prepack is None:
        prepack = (quant == "none" and not compile and dev.type == "cpu" and isinstance(base.backbone, Backbone)
                   and prepack_by_default())
    base.backbone.to(dev)
    _ready(base.backbone, dtype, prepack, quant)
    base.prepack = prepack
    return base


def _ready(part: torch.nn.Module, dtype: str, prepack: bool, quant: str = "none") -> None:
    """Cast a backbone or module (already on its device) for decoding; fuse its q/k/v and gate/up products
    (``model.fuse_projections``) before quantizing them (a backbone's before packing them too); quantized, its
    blocks decode through the compiled block (``kernels.attach``)."""
    part.to(getattr(torch, dtype))
    if (prepack and isinstance(part, Backbone)) or quant != "none":
        fuse_projections(part)
    if prepack:
        prepack_linears(part)
    if quant != "none":
        try:
            quantize_linears(part, quant, head_mode="int8")  # an int4 head costs most of int4's loss
        except ValueError as exc:
            raise BaseError(str(exc)) from None
        if isinstance(part, Backbone):  # verified stays exact: its calls attend as one-token calls do
            part.stack.row_invariant = True
        kernels.attach(part.stack)  # the compiled block where it builds, else the eager one


def module_for(base: Base, module: str | None, dtype: str = "float32", prepack: bool | None = None,
               quant: str = "none"):
    """The recyclable module ``module`` (a file, ``"default"`` or None) loaded for ``base``, on the
    backbone's device, ready to decode in ``dtype`` (and packed with ``prepack``, None: as the base was, or
    quantized with ``quant``) beside a backbone prepared the same way.

    Raises:
        CheckpointError: the module does not fit the base (widths or vocabulary).
    """
    from recyclegpt.checkpoint import CheckpointError, load_module
    from recyclegpt.modules import resolve_module

    path = resolve_module(module, base.name)
    if path is None:
        return None
    mod = load_module(path, base.backbone.config)
    if base.tokenizer.vocab_size > mod.config.vocab_size:
        raise CheckpointError(
            f"module {path} has a vocabulary of {mod.config.vocab_size}; the tokenizer of {base.name} "
            f"has {base.tokenizer.vocab_size} tokens"
        )
    mod.to(next(base.backbone.parameters()).device)
    _ready(mod, dtype, base.prepack if prepack is None else prepack, quant)
    return mod
