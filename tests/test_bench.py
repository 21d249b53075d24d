"""The decode-speed benchmark end to end on a tiny Llama shared by transformers and the native backbone."""

import json
import statistics

import pytest
import torch

from recyclegpt import bench
from recyclegpt.bases.convert import backbone_from_hf
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.bench import BenchError, PeakRSS, Row, engine_rows, hf_rows, plan_kinds, rotated, run_bench
from recyclegpt.cli import main
from recyclegpt.config import RecycleConfig
from recyclegpt.generate import Engine
from recyclegpt.recycle import RecyclableModule

ROW_FIELDS = {
    "name", "kind", "draft_len", "threshold", "tokens_per_s", "ms_per_token", "ratio_to_standard", "tau",
    "acceptance_rate", "peak_rss_mb", "rss_increase_mb", "new_tokens", "identical_prompts",
    "identical_to_standard", "module", "draft_width", "spread", "samples", "exit_layer", "catch_up_rate",
}
SAMPLE_FIELDS = {"position", "seconds", "new_tokens", "tokens_per_s", "ratio_to_standard"}


@pytest.fixture(scope="module")
def setup():
    """A random tiny LlamaForCausalLM, the same weights as a native backbone, and a random module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None, pad_token_id=0,
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(8)  # peaked logits: no float near-ties between the two implementations
    backbone = backbone_from_hf(hf)
    module = RecyclableModule(backbone.config, RecycleConfig(n_layers=1)).eval()
    return hf, Engine(backbone, ByteTokenizer(), module)


def test_bench_end_to_end_on_the_same_weights(setup, tmp_path):
    hf, engine = setup
    kinds = plan_kinds(None, has_module=True)
    rows = engine_rows(engine, kinds, 12, draft_lens=[1, 2], thresholds=[0.0, 0.6], draft_widths=[1, 3])
    rows += hf_rows(hf, kinds, 12, engine.tokenizer.eos_token_ids, engine.tokenizer.pad_token_id)
    other = engine.with_module(RecyclableModule(engine.backbone.config, RecycleConfig()))
    rows += engine_rows(other, ["verified", "adaptive"], 12, draft_lens=[1, 2], thresholds=[0.6], module="other")
    rows += engine_rows(engine, ["speed"], 12, draft_widths=[1, 2])  # the default exit: half the depth
    prompts = [list(b"The cat sat on the mat"), list(b"Once upon a time")]
    result = run_bench(rows, prompts, repeats=2)
    result = json.loads(json.dumps(result, allow_nan=False))
    by_name = {r["name"]: r for r in result["rows"]}
    assert list(by_name) == ["standard", "alternating", "verified-k1", "verified-k2", "verified-k1w3", "verified-k2w3",
                             "adaptive-0", "adaptive-0.6", "lookup",
                             "hf-generate", "hf-prompt-lookup", "verified-k1@other", "verified-k2@other",
                             "adaptive-0.6@other", "speed-e1", "speed-e1w2"]
    assert {r["module"] for r in result["rows"]} == {"", "other"}
    assert by_name["verified-k2@other"]["identical_to_standard"] is True  # a compared module is verified too
    for r in result["rows"]:
        assert set(r) == ROW_FIELDS
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["ratio_to_standard"] > 0
        assert r["peak_rss_mb"] > 0 and r["rss_increase_mb"] >= 0 and r["new_tokens"] == 12
    assert result["prompts"] == 2 and result["repeats"] == 2 and result["threads"] >= 1
    std = by_name["standard"]
    assert std["ratio_to_standard"] == 1.0 and std["tau"] == 1.0 and std["acceptance_rate"] is None
    assert by_name["verified-k2w3"]["draft_width"] == 3 and by_name["verified-k2"]["draft_width"] == 1
    for name in ("verified-k1", "verified-k2", "verified-k1w3", "verified-k2w3"):  # lossless, with real drafting
        assert by_name[name]["identical_to_standard"] is True and by_name[name]["identical_prompts"] == 2
        assert by_name[name]["tau"] >= 1.0 and 0.0 <= by_name[name]["acceptance_rate"] <= 1.0
    assert by_name["hf-generate"]["identical_to_standard"] is True  # same weights, same greedy tokens
    assert by_name["hf-prompt-lookup"]["identical_to_standard"] is True
    assert by_name["lookup"]["identical_to_standard"] is True and by_name["lookup"]["tau"] >= 1.0  # ours, verified
    assert by_name["hf-generate"]["tau"] is None
    assert by_name["alternating"]["tau"] > 1.5  # two tokens per full call after the prefill
    for name in ("speed-e1", "speed-e1w2"):  # exact; one token per call; at least the first call catches up
        assert by_name[name]["identical_to_standard"] is True and by_name[name]["exit_layer"] == 1
        assert by_name[name]["tau"] == 1.0 and 0 < by_name[name]["catch_up_rate"] <= 1
    assert by_name["speed-e1w2"]["draft_width"] == 2 and by_name["verified-k1"]["catch_up_rate"] is None
    for r in result["rows"]:  # every timed run kept; the reported figures are their medians
        runs = r["samples"]
        assert set(runs) == SAMPLE_FIELDS and all(len(v) == 2 * 2 for v in runs.values())
        assert statistics.median(runs["tokens_per_s"]) == pytest.approx(r["tokens_per_s"], abs=1e-3)
        assert statistics.median(runs["ratio_to_standard"]) == pytest.approx(r["ratio_to_standard"], abs=1e-4)
        assert r["spread"]["tokens_per_s"]["median"] == pytest.approx(r["tokens_per_s"], abs=1e-4)
        assert r["spread"]["tokens_per_s"]["min"] <= r["spread"]["tokens_per_s"]["max"]
        assert runs["new_tokens"] == [12] * 4
        for seconds, speed in zip(runs["seconds"], runs["tokens_per_s"], strict=True):
            assert seconds == pytest.approx(12 / speed, abs=2e-6)  # tok/s = the row's own tokens / seconds
    assert by_name["standard"]["samples"]["position"] == [0, 15, 14, 13]  # 16 rows, rotated by one per pass
    table = bench.format_table(result)
    assert all(name in table for name in by_name) and "own new tokens" in table
    pytest.importorskip("matplotlib")
    bench.plot(result, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_check_says_when_outputs_differ(setup):
    """A lossy row (alternating with a random module) and a row that differs on one prompt are flagged."""
    _, engine = setup
    standard, alternating = engine_rows(engine, ["standard", "alternating"], 12)
    prompts = [list(b"The cat sat on the mat"), list(b"Once upon a time")]

    def differs_on_second_prompt(ids: list[int]):
        toks, _ = standard.run(ids)
        return (toks[:-1] + [toks[-1] ^ 1] if ids == prompts[1] else toks), None

    stub = Row("differs-on-one", "hf-generate", differs_on_second_prompt)
    result = run_bench([standard, alternating, stub], prompts, repeats=1)
    by_name = {r["name"]: r for r in result["rows"]}
    assert by_name["standard"]["identical_to_standard"] is True and by_name["standard"]["identical_prompts"] == 2
    assert by_name["alternating"]["identical_to_standard"] is False
    assert by_name["alternating"]["identical_prompts"] < 2
    assert by_name["differs-on-one"]["identical_to_standard"] is False
    assert by_name["differs-on-one"]["identical_prompts"] == 1
    assert "no, 1 of 2" in bench.format_table(result)


def test_row_order_rotates_between_passes():
    """The rows run in a different order each pass (as recorded), and a row's tok/s uses its own tokens."""
    calls: list[str] = []

    def stub(name: str, n_tokens: int) -> Row:
        def run(ids: list[int]):
            calls.append(name)
            return list(range(n_tokens)), None

        return Row(name, "hf-generate", run)

    rows = [stub("standard", 6), stub("b", 3), stub("c", 6)]
    result = run_bench(rows, [[1], [2]], repeats=2)
    timed = calls[3 * len(rows):]  # after priming (first prompt) and warm-up (two prompts), in list order
    expected = [[r.name for r in rotated(rows, k)] for k in range(4)]
    assert len(timed) == 12 and [timed[i:i + 3] for i in range(0, 12, 3)] == expected
    assert expected[1] == ["b", "c", "standard"] and expected[2] == ["c", "standard", "b"]
    by_name = {r["name"]: r for r in result["rows"]}
    for k, order in enumerate(expected):  # the JSON records where each row ran in each pass
        assert [by_name[name]["samples"]["position"][k] for name in order] == [0, 1, 2]
    assert by_name["standard"]["samples"]["position"] != [0] * 4
    assert "rotated" in result["row_order"]
    assert by_name["b"]["new_tokens"] == 3 and by_name["b"]["samples"]["new_tokens"] == [3] * 4


def test_plan_kinds(monkeypatch):
    monkeypatch.setattr(bench, "available", lambda: False)  # llama-cpp-python absent: no llama.cpp rows by default
    assert plan_kinds(None, has_module=False) == ["standard", "lookup", *bench.HF_ROWS]  # no module needed
    assert plan_kinds(None, has_module=True) == [k for k in bench.ROW_KINDS if k not in (*bench.LLAMA_ROWS, "speed")]
    assert "speed" in plan_kinds(None, has_module=False, shared=True)  # by default only where blocks are shared
    assert plan_kinds(["llama-cpp-q4_0"], has_module=False) == ["standard", "llama-cpp-q4_0"]  # asked: planned
    monkeypatch.setattr(bench, "available", lambda: True)
    assert plan_kinds(None, has_module=True, shared=True) == list(bench.ROW_KINDS)
    assert plan_kinds(["hf-generate", "verified"], has_module=True) == ["standard", "verified", "hf-generate"]
    with pytest.raises(BenchError, match="need a recyclable module"):
        plan_kinds(["alternating"], has_module=False)
    with pytest.raises(BenchError, match="unknown row kind"):
        plan_kinds(["eagle"], has_module=True)


def test_run_bench_refuses_bad_requests(setup):
    _, engine = setup
    rows = engine_rows(engine, ["alternating"], 4)
    with pytest.raises(BenchError, match="must include 'standard'"):
        run_bench(rows, [[1, 2, 3]])
    rows = engine_rows(engine, ["standard"], 4)
    with pytest.raises(BenchError, match="no prompts"):
        run_bench(rows, [])
    with pytest.raises(BenchError, match="repeats must be"):
        run_bench(rows, [[1, 2]], repeats=0)
    with pytest.raises(ValueError, match="draft_len must be >= 1"):
        engine_rows(engine, ["verified"], 4, draft_lens=[0])
    with pytest.raises(ValueError, match="threshold must be in"):
        engine_rows(engine, ["adaptive"], 4, thresholds=[1.5])


def test_peak_rss_sees_an_allocation():
    import mmap

    # An anonymous mapping is always fresh pages (an allocator could reuse memory the process already holds).
    with mmap.mmap(-1, 64 * 2**20) as block, PeakRSS() as mem:  # PeakRSS exits (and samples) first
        block.write(b"\x01" * (64 * 2**20))  # touch every page
    assert mem.peak - mem.start >= 48 * 2**20


@pytest.mark.parametrize("content, message", [
    (None, "prompt file not found"),
    ("\n  \n", "is empty"),
    ('{"prompt": 3}\n', "'prompt' must be a non-empty string"),
    ("{not json\n", "expected a JSON object with a 'prompt' field"),
])
def test_bench_cli_rejects_bad_prompt_files_before_loading_a_model(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "4"]) == 2
    assert message in capsys.readouterr().err


def test_llama_cpp_rows_without_llama_cpp_python_say_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from recyclegpt.bases import BaseError
    from recyclegpt.bases.llamacpp import quantized_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it fails, as where it is not installed
    monkeypatch.setenv("RECYCLEGPT_HOME", str(tmp_path))  # no cached file to fall back on
    with pytest.raises(BaseError, match=r"llama-cpp-python, which is not installed: pip install 'recyclegpt\[llamacpp"):
        quantized_gguf("smollm2-135m", "q4_0")
    with pytest.raises(BaseError, match="unknown llama.cpp format 'q5_k'; choose one of q4_0, q8_0"):
        quantized_gguf("smollm2-135m", "q5_k")
