"""What machine a figure was measured on: the CPU's model and the vector features that decide which kernels
run fast (AVX2, AVX-512, AVX512-BF16, AMX), as ``recyclegpt info`` prints and every bench / eval / lm-eval
JSON records; and the CPU set-up every command that computes runs first (``setup_cpu``).

The three CPU kinds this project has met differ in what is fast: an Intel Xeon with AMX, an AMD EPYC Zen 4
(AVX-512 with BF16, no AMX) and an AMD EPYC Zen 3 (AVX2 only). Nothing here is detected at import time.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

# The flags of /proc/cpuinfo that matter for this project's products, in the order they are printed.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CPUInfo:
    """One CPU, as far as decoding speed goes.

    Attributes:
        model: the vendor's model name (e.g. ``AMD EPYC``, ``Intel(R) Xeon(R) Platinum 8481C``).
        family: vendor, family and model numbers (``AuthenticAMD 25/17``), which tell generations apart
            where a virtual machine shortens the model name.
        generation: what family and features say (``AMD Zen 3``, ``AMD Zen 4``, ``AMD Zen 5``, ``Intel with
            AMX``), or ``unknown``.
        cores: logical CPUs this process may run on.
        features: those of ``FEATURES`` the CPU reports.
        kind: ``amx`` (AMX tiles), ``avx512-bf16``, ``avx512``, ``avx2`` or ``other``: the widest of them.
        torch_capability: the vector level PyTorch's own kernels dispatch to (``AVX512``, ``AVX2``, ...).
    """

    model: str
    family: str
    generation: str
    cores: int
    features: tuple[str, ...]
    kind: str
    torch_capability: str

    def describe(self) -> str:
        """One line: model, cores, kind and features."""
        features = " ".join(self.features) or "none"
        return (f"{self.model} ({self.generation}; {self.family}), {self.cores} cores, kind {self.kind} "
                f"(features: {features}; PyTorch kernels: {self.torch_capability})")

    def record(self) -> dict:
        """The fields as a JSON-ready dict, for result files."""
        return {**asdict(self), "features": list(self.features)}


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CPUInfo:
    """Read this machine's CPU (Linux ``/proc/cpuinfo``; elsewhere the model from ``platform`` and no flags).

    Args:
        cpuinfo: the file to read, for tests.
    """
    import torch

    fields: dict[str, str] = {}  # the first processor's entries
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    features = tuple(f for f in FEATURES if f in fields.get("flags", "").split())
    vendor, number = fields.get("vendor_id", "?"), fields.get("cpu family", "?")
    return CPUInfo(model=model, family=f"{vendor} {number}/{fields.get('model', '?')}",
                   generation=cpu_generation(vendor, number, features), cores=len(os.sched_getaffinity(0)),
                   features=features, kind=cpu_kind(features),
                   torch_capability=torch.backends.cpu.get_cpu_capability())


def cpu_kind(features: tuple[str, ...] | set[str]) -> str:
    """The widest vector kind among ``features``: ``amx``, ``avx512-bf16``, ``avx512``, ``avx2`` or ``other``."""
    for kind, flag in (("amx", "amx_tile"), ("avx512-bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in features:
            return kind
    return "other"


def cpu_generation(vendor: str, family: str, features: tuple[str, ...] | set[str]) -> str:
    """A CPU generation from the vendor, the family number and the features: AMD family 25 is Zen 3 without
    AVX-512 and Zen 4 with it, family 26 is Zen 5; an Intel CPU with AMX tiles is ``Intel with AMX``."""
    if vendor == "AuthenticAMD" and family == "25":
        return "AMD Zen 4" if "avx512f" in features else "AMD Zen 3"
    if vendor == "AuthenticAMD" and family == "26":
        return "AMD Zen 5"
    if vendor == "GenuineIntel":
        return "Intel with AMX" if "amx_tile" in features else "Intel"
    return "unknown"


def prepack_by_default(cpu: CPUInfo | None = None) -> bool:
    """Whether float32 / bfloat16 decoding on this CPU multiplies through oneDNN with packed weights
    (``--prepack``) unless told otherwise: the path measured fastest on each CPU kind met so far.

    On AMD EPYC (Zen 3, Zen 4/5) MKL's products of two rows cost about twice those of one while oneDNN's
    packed products cost the same for 1-4 rows (docs/performance.md): standard decoding 1.5x faster, and every
    drafting strategy relies on that flat curve. On the Intel Xeon with AMX, MKL's products were already flat
    (a call over 2 tokens 1.03x one) and the packed path was never measured there, so Intel keeps MKL. Needs
    PyTorch's oneDNN backend.

    Args:
        cpu: the CPU (default: this machine's).
    """
    import torch

    cpu = cpu or cpu_info()
    return cpu.family.startswith("AuthenticAMD") and torch.backends.mkldnn.is_available()


def product_path(prepack: bool, quant: str = "none", compile: bool = False, device: str = "cpu") -> str:
    """The products a decoding engine runs, in words, for ``recyclegpt info`` and result files."""
    if not str(device).startswith("cpu"):
        return f"{device} (PyTorch's own kernels)"
    if quant != "none":
        return f"{quant} weight-only"
    if compile:
        return "torch.compile (inductor)"
    return "oneDNN, weights packed once (--prepack)" if prepack else "MKL through F.linear (--no-prepack)"


def measured_on() -> dict:
    """What a measured result (bench, eval, lm-eval JSON) records of the machine: the CPU (``cpu_info``), the torch
    version and torch's thread count."""
    import torch

    return {"cpu": cpu_info().record(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def setup_cpu(threads: int | None = None) -> None:
    """The CPU set-up of every command that computes: an allocator that keeps freed memory
    (``keep_freed_memory``) and torch's thread count.

    Args:
        threads: torch's CPU threads; None or 0 leaves torch's default.
    """
    import torch

    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)


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
