import json

import pytest

from recyclegpt.cli import main
from recyclegpt.hardware import cpu_generation, cpu_info, cpu_kind, prepack_by_default, product_path

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: (a second processor's entries are not read)
flags\t\t: avx512f
"""
SAPPHIRE = """vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


@pytest.mark.parametrize("text, model, generation, kind, features", [
    (ZEN3, "AMD EPYC 7B13", "AMD Zen 3", "avx2", ("avx2", "fma")),
    (SAPPHIRE, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "Intel with AMX", "amx",
     ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")),
])
def test_cpu_info_reads_the_first_processor(tmp_path, text, model, generation, kind, features):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    cpu = cpu_info(path)
    assert (cpu.model, cpu.generation, cpu.kind, cpu.features) == (model, generation, kind, features)
    assert cpu.cores >= 1 and cpu.torch_capability
    assert json.loads(json.dumps(cpu.record()))["features"] == list(features)
    assert model in cpu.describe() and kind in cpu.describe()


def test_kinds_and_generations():
    assert cpu_kind({"avx2", "avx512f"}) == "avx512" and cpu_kind({"sse2"}) == "other"
    assert cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "avx512-bf16"
    assert cpu_generation("AuthenticAMD", "25", {"avx512f"}) == "AMD Zen 4"
    assert cpu_generation("AuthenticAMD", "26", {"avx512f"}) == "AMD Zen 5"
    assert cpu_generation("HygonGenuine", "24", set()) == "unknown"


def test_info_prints_the_cpu(capsys):
    assert main(["info", "--preset", "tiny", "--print-json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] == cpu_info().record()
    assert info["products"] == product_path(prepack_by_default())
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"cpu: {cpu_info().describe()}" in out and f"by default): {info['products']}" in out


def test_the_default_product_path_per_cpu_kind(tmp_path):
    """oneDNN with packed weights on AMD (measured fastest on Zen 3, 4 and 5), MKL on Intel (never measured
    slower there); what each path is called in info and result files."""
    (tmp_path / "zen3").write_text(ZEN3)
    (tmp_path / "xeon").write_text(SAPPHIRE)
    assert prepack_by_default(cpu_info(tmp_path / "zen3")) is True
    assert prepack_by_default(cpu_info(tmp_path / "xeon")) is False
    assert product_path(True) == "oneDNN, weights packed once (--prepack)"
    assert product_path(False).startswith("MKL")
    assert product_path(True, quant="int4").startswith("int4 weight-only")
    assert product_path(False, compile=True) == "torch.compile (inductor)"
    assert product_path(False, device="cuda").startswith("cuda")
