import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.data import (
    NEAR_DUPLICATE_OVERLAP,
    DataError,
    PromptFilter,
    TokenData,
    corpus_lines,
    exclude_prompts,
    held_out_start,
    merge,
    open_distilled,
    prepare,
    read_prompts,
    read_tokens,
    split_corpora,
)

TEXT = "The recyclable module reads the last hidden state and the next token, and guesses the one after.\n\n"


def test_prepare_splits_and_round_trips(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(TEXT * 4000)  # ~390 kB: several 64k-character chunks
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document {i}. " + TEXT}) for i in range(50)))
    meta = prepare([src, jsonl], ByteTokenizer(eos_token_id=0), tmp_path / "out", val_fraction=0.2)
    data = TokenData(tmp_path / "out")
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    n_chunks = 50 + 6  # jsonl rows + text chunks
    assert total == len(TEXT.encode()) * 4000 + sum(len(f"document {i}. {TEXT}") for i in range(50)) + n_chunks
    assert meta["tokens"]["val"] > 0 and data.splits["train"].dtype == np.uint16
    a = data.batch("train", 4, 32, seed=1, step=7)
    assert a.shape == (4, 32) and (a == data.batch("train", 4, 32, seed=1, step=7)).all()
    assert not (a == data.batch("train", 4, 32, seed=1, step=8)).all()
    assert bytes(a[0].tolist()).decode() in (TEXT * 3)
    with pytest.raises(DataError, match="is not a `data distill` output"):  # eval --answers needs distilled answers
        open_distilled(tmp_path / "out")


def _word_tokenizer(prepends_bos: bool):
    """A six-word transformers tokenizer built offline; ``prepends_bos``: ``tok(text)`` starts with <bos> (id 1),
    as Gemma's does, else it adds nothing, as SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from recyclegpt.bases.tokenizer import HFTokenizer

    words = Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4, "c": 5}, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepends_bos:
        words.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>"))


def test_documents_start_with_bos_only_where_the_tokenizer_prepends_one(tmp_path):
    bos, plain = _word_tokenizer(True), _word_tokenizer(False)
    assert bos.bos_token_id == 1 and plain.bos_token_id is None  # both name a <bos>; only one prepends it
    assert bos.encode("a b") == [1, 3, 4] == bos.encode("<bos> a b") and bos.encode("a b", bos=False) == [3, 4]
    assert plain.encode("a b") == [3, 4]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "<bos> c", "b c a", "a"]))
    for tok, name, docs in ((bos, "bos", [[1, 3, 4], [1, 5], [1, 4, 5, 3], [1, 3]]),
                            (plain, "plain", [[3, 4], [1, 5], [4, 5, 3], [3]])):
        prepare([src], tok, tmp_path / name, val_fraction=0.25)  # every 4th document is held out
        data = TokenData(tmp_path / name)
        assert data.splits["train"].tolist() == [t for d in docs[:3] for t in d + [2]]  # one <bos> a document
        assert data.splits["val"].tolist() == docs[3] + [2]
        assert read_tokens(src, tok, 100) == [t for d in docs for t in d]  # evaluation reads the same documents


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "input file is empty"),
        ("blob.txt", b"\x00\x01\x02binary", "looks binary"),
        ("table.csv", b"a,b\n", "unsupported input table.csv"),
        ("bad.jsonl", b'{"txt": 1}\n', "expected a JSON object with a 'text' field"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([path], ByteTokenizer(), tmp_path / "out")
    with pytest.raises(DataError, match="input file not found"):
        prepare([tmp_path / "missing.txt"], ByteTokenizer(), tmp_path / "out")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData(tmp_path)


def test_merge_and_prompts(tmp_path):
    for name in ("x", "y"):
        (tmp_path / f"{name}.txt").write_text(TEXT * 3000)
        prepare([tmp_path / f"{name}.txt"], ByteTokenizer(), tmp_path / name, val_fraction=0.25)
    meta = merge([tmp_path / "x", tmp_path / "y"], tmp_path / "xy")
    assert meta["tokens"]["train"] == 2 * TokenData(tmp_path / "x").meta["tokens"]["train"]
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(lines) == ["first prompt", "second prompt"]
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "hello"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: expected a JSON object with a 'prompt' field"):
        read_prompts(js)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        read_prompts(tmp_path / "e.txt")
    # Held-out prompts are kept out of training prompts: case and surrounding space ignored, order kept.
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "  Second PROMPT "}\n{"prompt": "absent"}\n')
    excluded = read_prompts(held) + read_prompts(lines)
    assert exclude_prompts(["first prompt", "second prompt", "third", "first prompt"], excluded) == (["third"], 3)
    assert exclude_prompts(["a", "Second prompt"], read_prompts(held)) == (["a"], 1)


def test_exclude_drops_near_duplicates_by_the_stated_rule():
    bench = ["Explain how a hash table handles collisions, with a short example in Python.",
             "What is RAM?"]
    near = [
        "explain how a hash table handles collisions -- with a short example in python",  # punctuation, case
        "Explain how a hash table handles  collisions, with a short example in Python!!",  # spacing
        "Explain how a hash table handles collisions, with a short example in Python code.",  # one word added
        "what is  RAM",
    ]
    far = [
        "Explain how a hash table handles resizing, with a short example in Rust.",  # two words changed
        "What is ROM?",
        "Explain how a hash table works.",
    ]
    kept, dropped = exclude_prompts(near + far, bench)
    assert (kept, dropped) == (far, len(near))
    # by hand: 13 words (11 trigrams) against 14 (12): 11 shared, 12 in the union; two words changed: 7 of 15
    assert 11 / 12 >= NEAR_DUPLICATE_OVERLAP > 7 / 15
    assert "Explain how a hash table handles collisions, with a short example in Python code." in PromptFilter(bench)


def _script(name: str):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpora(root: Path, n_lines: int = 400) -> Path:
    """Four corpus files whose held-out tail (last 10 % of lines) is marked HELDOUT on every line."""
    root.mkdir()
    cut = held_out_start(n_lines)
    for name in ("austen", "kjv", "pythondoc", "linuxdoc"):
        lines = []
        for i in range(n_lines):
            tag = "HELDOUT" if i >= cut else "heldin"
            # every third line a reST title (for the docs) followed by its underline
            lines.append(f"Topic {tag} {name} {i}" if i % 3 == 1 else ("=" * 12 if i % 3 == 2 else f"{tag} line {i}"))
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_split_is_the_last_tenth_of_lines(tmp_path):
    assert held_out_start(73439) == 66095 and held_out_start(32422) == 29179  # the shell's $((n*9/10))
    assert [held_out_start(n) for n in (0, 1, 9, 10, 11, 100)] == [0, 0, 8, 9, 9, 90]
    corpora = _corpora(tmp_path / "c")
    heldin, heldout = corpus_lines(corpora / "kjv.txt", "heldin"), corpus_lines(corpora / "kjv.txt", "heldout")
    assert len(heldin) == 360 and len(heldout) == 40
    assert not any("HELDOUT" in line for line in heldin)
    assert all("HELDOUT" in line for line in heldout if line[0] != "=")
    counts = split_corpora([corpora / "kjv.txt"], tmp_path / "split")
    assert counts == {"kjv.txt": {"heldin": 360, "heldout": 40}}
    assert (tmp_path / "split" / "heldout" / "kjv.txt").read_text().splitlines() == heldout
    assert (tmp_path / "split" / "heldin" / "kjv.txt").read_text().splitlines() == heldin
    with pytest.raises(DataError, match="unknown corpus part 'tail'"):
        corpus_lines(corpora / "kjv.txt", "tail")


def test_training_prompts_never_read_the_held_out_tail(tmp_path):
    corpora = _corpora(tmp_path / "c")
    out = tmp_path / "prompts.jsonl"
    assert _script("make_prompts").main(["--corpora", str(corpora), "--out", str(out), "--n", "900"]) == 0
    prompts = read_prompts(out)
    passages = [p for p in prompts if "\n\n" in p]
    assert len(prompts) == 900 and len(passages) >= 250  # a third are passage tasks over the two texts
    assert any("Topic heldin" in p for p in prompts)  # titles come from the docs' held-in part
    assert not [p for p in prompts if "HELDOUT" in p]  # 10 % of 300 passages would be ~30 hits if read
