import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.data import (
    DataError,
    TokenData,
    corpus_lines,
    exclude_prompts,
    held_out_start,
    merge,
    open_distilled,
    prepare,
    read_prompts,
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
