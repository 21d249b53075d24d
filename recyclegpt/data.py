"""Text and token files: text files -> token memmaps with a train/validation split, and windows to train on.

Also the other files the package reads and writes: prompt files (``read_prompts``, ``prompt_ids``, the
``PromptFilter`` that keeps excluded prompts out), the corpus split (``corpus_lines``, ``split_corpora``),
the first tokens of a text file (``read_tokens``), the hidden-state cache for attach training
(``HiddenData`` / ``cache_hidden``) and the output of ``workflows.distill`` read back (``open_distilled``,
``distilled_answers``). Nothing here decodes; this module imports no other module of the package, so every
layer may import it (the workflows that run an engine to make data are in ``workflows.py``).

A prepared directory holds ``train.bin`` and ``val.bin`` (flat token ids, uint16 when the vocabulary
fits, else uint32, documents separated by the tokenizer's EOS) and ``meta.json``. Text is read in
chunks, so files larger than memory stream through. Every ``1/val_fraction``-th chunk goes to the
validation split: deterministic, and held out from training.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
CHUNK_CHARS = 1 << 16


class DataError(ValueError):
    """An input file or prepared directory cannot be used."""


def check_file(path: Path) -> None:
    """Refuse a missing, empty, binary or unsupported input file with a clear ``DataError``."""
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"input file is empty: {path}")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES | {".jsonl", ".parquet"}:
        raise DataError(
            f"unsupported input {path.name}: accepted are {', '.join(sorted(TEXT_SUFFIXES))}, .jsonl (a 'text' "
            "field per line) and .parquet (a 'text' column)"
        )
    if suffix != ".parquet":
        with path.open("rb") as f:
            if b"\x00" in f.read(8192):
                raise DataError(f"{path} looks binary (NUL bytes), not text")


def iter_text(path: Path) -> Iterator[str]:
    """Chunks of text of one file (about 64k characters each; never a whole big file at once)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise DataError(f"{path} has no 'text' column (columns: {table.schema_arrow.names})")
        for batch in table.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            buf = ""
            for line in f:
                buf += line
                if len(buf) >= CHUNK_CHARS and line.strip() == "":  # cut at paragraph breaks
                    yield buf
                    buf = ""
            if buf.strip():
                yield buf


def read_tokens(path: str | Path, tokenizer, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of a text file (.txt .md .rst .jsonl .parquet), read in chunks.

    Each text of ``iter_text`` (a .jsonl/.parquet document, or a ~64k-character chunk of a plain file) is
    encoded as ``prepare`` encodes it: starting with the model's BOS where the model expects one, so
    the first window reads a document's start as the model was trained to (SmolLM2 adds none).

    Raises:
        DataError: a missing, empty, binary or unsupported file.
    """
    p = Path(path)
    check_file(p)
    ids: list[int] = []
    for text in iter_text(p):
        ids.extend(tokenizer.encode(text))
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


CORPUS_PARTS = ("heldin", "heldout")  # the two sides of a corpus file (held_out_start)
HELD_OUT_TENTHS = 1  # the last tenth of the lines of every corpus file is held out from all training data


def held_out_start(n_lines: int) -> int:
    """Index of a corpus file's first held-out line: the file's last 10 % of lines are held out.

    The one split of the project's corpora (``scripts/fetch_corpora.py``): everything that makes training
    data (``scripts/make_prompts.py``, ``data split``'s ``heldin`` files) reads lines before this index,
    evaluation (``scripts/make_tasks.py``, the ``heldout`` files) only lines from it on. Equal to
    ``head -n $((n*9/10))`` in the shell.
    """
    return n_lines * (10 - HELD_OUT_TENTHS) // 10


def corpus_lines(path: str | Path, part: str) -> list[str]:
    """The lines of a corpus file on one side of the held-out split: ``part`` is ``heldin`` or ``heldout``.

    Raises:
        DataError: an unknown ``part``, or a missing, empty or binary file.
    """
    if part not in CORPUS_PARTS:
        raise DataError(f"unknown corpus part {part!r}; choose heldin (training data) or heldout (evaluation)")
    return corpus_parts(path)[part]


def corpus_parts(path: str | Path) -> dict[str, list[str]]:
    """Both sides of a corpus file's held-out split, from one read: ``{"heldin": lines, "heldout": lines}``.

    Raises:
        DataError: a missing, empty or binary file.
    """
    p = Path(path)
    check_file(p)
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    cut = held_out_start(len(lines))
    return {"heldin": lines[:cut], "heldout": lines[cut:]}


def split_corpora(paths: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Write each corpus file's two sides as ``OUT/heldin/NAME`` and ``OUT/heldout/NAME``.

    Returns:
        Per file name, the line counts of both sides.
    """
    if not paths:
        raise DataError("no corpus files given: name the files to split (e.g. data/corpora/kjv.txt)")
    out, counts = Path(out_dir), {}
    for path in paths:
        p = Path(path)
        parts = corpus_parts(p)
        for part, lines in parts.items():
            (out / part).mkdir(parents=True, exist_ok=True)
            tmp = out / part / f"{p.name}.tmp"
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            tmp.replace(out / part / p.name)
        counts[p.name] = {part: len(lines) for part, lines in parts.items()}
    return counts


class SplitWriter:
    """``train.bin`` / ``val.bin`` written through temporary files, renamed into place by ``commit``
    (``prepare`` here, ``workflows.distill``)."""

    def __init__(self, out: Path, vocab_size: int) -> None:
        self.out = out
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.counts = {"train": 0, "val": 0}
        self.files = {s: (out / f"{s}.bin.tmp").open("wb") for s in self.counts}

    def write(self, split: str, ids: Sequence[int]) -> None:
        self.files[split].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.counts[split] += len(ids)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def commit(self) -> None:
        for split in self.counts:
            (self.out / f"{split}.bin.tmp").replace(self.out / f"{split}.bin")


def prepare(
    inputs: Sequence[str | Path], tokenizer, out_dir: str | Path, val_fraction: float = 0.01, name: str = ""
) -> dict:
    """Tokenize text files into ``out_dir/{train,val}.bin`` and ``meta.json``.

    Each text of ``iter_text`` (a .jsonl/.parquet document, or a ~64k-character chunk of a plain file) is
    one document: it starts with the model's BOS where the model expects one (Gemma; not SmolLM2) and ends
    with its EOS, so training windows cut from the stream see documents as the model saw them.

    Args:
        inputs: text files (.txt .md .rst .jsonl .parquet).
        tokenizer: the chosen model's tokenizer (``encode``, ``eos_token_ids``, ``vocab_size``).
        out_dir: destination directory (created).
        val_fraction: share of chunks held out for validation, in (0, 0.5].
        name: the tokenizer's model name, recorded in the metadata.

    Returns:
        The metadata written to ``meta.json`` (token counts per split).
    """
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for p in paths:
        check_file(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    every = max(round(1 / val_fraction), 2)
    splits = SplitWriter(out, tokenizer.vocab_size)
    total = sum(p.stat().st_size for p in paths)
    chunk_index = 0
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
            for path in paths:
                for text in iter_text(path):
                    ids = tokenizer.encode(text)
                    if eos is not None:
                        ids.append(eos)
                    splits.write("val" if chunk_index % every == every - 1 else "train", ids)
                    chunk_index += 1
                    bar.update(len(text.encode("utf-8", errors="replace")))
    finally:
        splits.close()
    counts = splits.counts
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError(
            f"too little text for a train/validation split ({counts}); add text or raise val_fraction"
        )
    splits.commit()
    meta = {"dtype": np.dtype(splits.dtype).name, "vocab_size": tokenizer.vocab_size, "tokenizer": name,
            "inputs": [str(p) for p in paths], "tokens": counts, "val_fraction": val_fraction}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def frequent_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Ids of the ``size`` most frequent tokens given per-id counts (V,): a draft vocabulary."""
    if size <= 0 or size > counts.numel():
        raise ValueError(f"draft vocabulary size must be in [1, {counts.numel()}], got {size}")
    return torch.topk(counts.double(), size).indices.sort().values


def _draws(seed: int, step: int, high: int, n: int) -> list[int]:
    """n integers in [0, high) that depend only on (seed, step): the data a training step sees."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, high, (n,), generator=g).tolist()


class TokenData:
    """Random training windows from a prepared directory, deterministic in (seed, step).

    The windows of step s depend only on the seed and s, so a resumed run sees exactly the data the
    uninterrupted run would have, and every DDP rank can draw the same global batch and take its rows.
    """

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{d} is not a prepared data directory (no meta.json); run `recyclegpt data prepare`")
        self.meta = json.loads(meta_path.read_text())
        self.dir = d
        self.splits = {
            s: np.memmap(d / f"{s}.bin", dtype=self.meta["dtype"], mode="r") for s in ("train", "val")
        }

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def draft_vocab(self, size: int) -> tuple[torch.Tensor, float]:
        """The ``size`` most frequent token ids of the train split (a module's draft vocabulary) and the
        share of the split's tokens they cover."""
        counts = torch.from_numpy(np.bincount(self.splits["train"], minlength=self.vocab_size))
        ids = frequent_tokens(counts, size)
        return ids, float(counts[ids].sum() / counts.sum())

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
        """(batch_size, seq_len) windows of token ids for one step."""
        data = self.splits[split]
        if len(data) <= seq_len:
            raise DataError(f"the {split} split has {len(data)} tokens, fewer than seq_len {seq_len} + 1")
        starts = _draws(seed, step, len(data) - seq_len, batch_size)
        return torch.from_numpy(np.stack([data[s : s + seq_len].astype(np.int64) for s in starts]))


class HiddenData:
    """Fixed token windows with the frozen base's final hidden states, cached on disk for attach training.

    A module attached to a frozen base needs, per window, only the base's final hidden states h: they
    are the module's input and, through the shared head, the teacher's logits. Computing them once
    (``cache_hidden``) makes every later epoch cost the module alone instead of a full base forward.
    Windows are the data's consecutive non-overlapping ``seq_len`` slices (the base sees each window on
    its own, as in uncached training); a step draws its windows deterministically from (seed, step).

    Files: ``meta.json``, ``{split}_tokens.bin`` (windows, seq_len) int32 and ``{split}_hidden.bin``
    (windows, seq_len, d_model) bfloat16 stored as int16.
    """

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{d} is not a hidden-state cache (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("kind") != "hidden-states":
            raise DataError(f"{d} is not a hidden-state cache (meta.json kind is {self.meta.get('kind')!r})")
        self.dir, self.seq_len, width = d, int(self.meta["seq_len"]), int(self.meta["d_model"])
        self.tokens, self.hidden = {}, {}
        for split in ("train", "val"):
            n = int(self.meta["windows"][split])
            self.tokens[split] = np.memmap(d / f"{split}_tokens.bin", np.int32, "r", shape=(n, self.seq_len))
            self.hidden[split] = np.memmap(d / f"{split}_hidden.bin", np.int16, "r", shape=(n, self.seq_len, width))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, ...]:
        """(tokens (B, T) int64, hidden (B, T, d) float32) of ``batch_size`` cached windows for one step."""
        if seq_len != self.seq_len:
            raise DataError(f"the hidden-state cache {self.dir} holds windows of {self.seq_len} tokens, not {seq_len}")
        rows = _draws(seed, step, len(self.tokens[split]), batch_size)
        tokens = torch.from_numpy(np.stack([self.tokens[split][r] for r in rows]).astype(np.int64))
        hidden = torch.from_numpy(np.stack([self.hidden[split][r] for r in rows])).view(torch.bfloat16).float()
        return tokens, hidden


def cache_hidden(
    backbone: torch.nn.Module, data: TokenData, out_dir: str | Path, seq_len: int, identity: dict,
    batch_size: int = 8, bf16: bool = True,
) -> HiddenData:
    """The frozen base's final hidden states over every window of ``data``, cached in ``out_dir``.

    An existing cache is reused when it was built for the same base, data and window length, and
    refused otherwise (so a stale cache never trains a module silently). A new cache is written into a
    temporary directory and renamed into place: an interrupted build leaves nothing half-written.

    Args:
        backbone: the frozen base (its forward returns ``(logits, hidden)``).
        data: the prepared token data the windows come from.
        out_dir: the cache directory.
        seq_len: window length (the training ``--seq-len``).
        identity: the base's identity (name, source) stored with the cache and checked on reuse.
        batch_size: windows per forward.
        bf16: run the base under bfloat16 autocast (as ``--bf16`` training does).

    Raises:
        DataError: an existing cache built for something else, or a split shorter than one window.
    """
    out = Path(out_dir)
    want = {"kind": "hidden-states", "base": identity, "data": str(Path(data.dir).resolve()),
            "data_tokens": data.meta.get("tokens"), "seq_len": seq_len, "d_model": backbone.config.d_model,
            "vocab_size": data.vocab_size, "bf16": bf16}
    if (out / "meta.json").is_file():
        have = json.loads((out / "meta.json").read_text())
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            raise DataError(f"hidden-state cache {out} was built for other settings ({', '.join(diff)} differ); "
                            "delete it or give another directory")
        return HiddenData(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a hidden-state cache; give an empty or new directory")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    device = next(backbone.parameters()).device
    windows = {s: len(data.splits[s]) // seq_len for s in ("train", "val")}
    for split, n in windows.items():
        if n == 0:
            raise DataError(f"the {split} split of {data.dir} is shorter than one window of {seq_len} tokens")
    with tqdm(total=sum(windows.values()) * seq_len, desc="caching hidden states", unit="tok", unit_scale=True) as bar:
        for split, n in windows.items():
            tokens = np.memmap(tmp / f"{split}_tokens.bin", np.int32, "w+", shape=(n, seq_len))
            tokens[:] = np.asarray(data.splits[split][: n * seq_len]).reshape(n, seq_len)
            hidden = np.memmap(tmp / f"{split}_hidden.bin", np.int16, "w+", shape=(n, seq_len, want["d_model"]))
            for lo in range(0, n, batch_size):
                x = torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64)).to(device)
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    _, h = backbone(x, logits_last=1)
                hidden[lo : lo + len(x)] = h.to(torch.bfloat16).view(torch.int16).cpu().numpy()
                bar.update(x.numel())
            tokens.flush()
            hidden.flush()
            del tokens, hidden
    (tmp / "meta.json").write_text(json.dumps(want | {"windows": windows}, indent=2) + "\n")
    tmp.replace(out)
    return HiddenData(out)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSONL objects with a ``prompt`` field.

    Raises:
        DataError: a missing or empty file, or a JSONL line without a string ``prompt``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p}")
    lines = [line for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"prompt file {p} is empty: give one prompt per line, or JSONL with a 'prompt' field")
    if p.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
                prompt = obj["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{p}:{i}: expected a JSON object with a 'prompt' field") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{p}:{i}: 'prompt' must be a non-empty string")
            prompts.append(prompt)
        return prompts
    return lines


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The token ids a prompt is decoded from: the user turn in the tokenizer's chat template when ``chat``,
    else the text itself, with the model's BOS once where it expects one (a template that writes ``<bos>``
    itself gets no second). Distillation, evaluation, the copy gate's fit and the benchmark all encode this
    way, so stored answers can be matched back to their prompts."""
    return tokenizer.encode(tokenizer.apply_chat([{"role": "user", "content": prompt}]) if chat else prompt)


NEAR_DUPLICATE_OVERLAP = 0.8  # Jaccard overlap of word trigram sets above which two prompts are one


class PromptFilter:
    """Recognises prompts that are, or nearly are, one of a set of excluded prompts.

    The rule (``prompt in PromptFilter(excluded)``): a prompt matches an excluded one when the two are
    equal after normalisation (case folded, punctuation dropped, runs of whitespace made one space), or,
    for prompts of at least 3 words, when their sets of word trigrams (of the normalised text) overlap by
    at least ``NEAR_DUPLICATE_OVERLAP`` (intersection over union): a long prompt with a word or two changed.
    """

    def __init__(self, excluded: Sequence[str]) -> None:
        self.keys = {_normalise(q) for q in excluded}
        self.grams: list[set[tuple[str, ...]]] = []
        self.index: dict[tuple[str, ...], list[int]] = {}  # trigram -> excluded prompts that hold it
        for key in self.keys:
            grams = _trigrams(key)
            if grams:
                for g in grams:
                    self.index.setdefault(g, []).append(len(self.grams))
                self.grams.append(grams)

    def __contains__(self, prompt: str) -> bool:
        key = _normalise(prompt)
        if key in self.keys:
            return True
        grams = _trigrams(key)
        shared: dict[int, int] = {}
        for g in grams:
            for i in self.index.get(g, ()):
                shared[i] = shared.get(i, 0) + 1
        return any(n / (len(grams) + len(self.grams[i]) - n) >= NEAR_DUPLICATE_OVERLAP for i, n in shared.items())


def _normalise(prompt: str) -> str:
    """A prompt case folded, without punctuation, its words separated by single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.casefold()).split())


def _trigrams(key: str) -> set[tuple[str, ...]]:
    """The word trigrams of a normalised prompt (none under 3 words)."""
    words = key.split()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def exclude_prompts(prompts: Sequence[str], excluded: Sequence[str]) -> tuple[list[str], int]:
    """``prompts`` without those that equal or nearly equal one of ``excluded`` (:class:`PromptFilter`'s rule).

    Keeps benchmark and held-out prompts (``read_prompts`` of their files) out of training data. Returns the
    kept prompts, in order, and how many were dropped.
    """
    banned = PromptFilter(excluded)
    kept = [p for p in prompts if p not in banned]
    return kept, len(prompts) - len(kept)


def open_distilled(out_dir: str | Path) -> TokenData:
    """A ``workflows.distill`` output directory, opened for :func:`distilled_answers`.

    Raises:
        DataError: not a prepared directory, or one that ``data distill`` did not write.
    """
    data = TokenData(out_dir)
    if data.meta.get("kind") != "self-distillation" or not (data.dir / "samples.jsonl").is_file():
        raise DataError(f"{out_dir} is not a `data distill` output (no self-distillation meta.json and samples.jsonl)")
    return data


def distilled_answers(data: TokenData, tokenizer, chat: bool = True) -> list[tuple[list[int], list[int]]]:
    """The (prompt ids, answer ids) pairs stored by ``workflows.distill``, in ``samples.jsonl`` order.

    Each answer is the base's greedy output as ``Engine.generate`` returned it: ending in an end-of-sequence
    token when the base stopped, without one when it was cut at ``max_new_tokens``.

    Args:
        data: the distill output (:func:`open_distilled`).
        tokenizer: the tokenizer it was distilled with.
        chat: whether the chat template was applied to the prompts (as ``distill`` did for a chat base).

    Raises:
        DataError: its tokens do not follow its prompts under this tokenizer.
    """
    eos, cap = set(tokenizer.eos_token_ids), data.meta["max_new_tokens"]
    pos, pairs = dict.fromkeys(data.splits, 0), []
    for n, line in enumerate((data.dir / "samples.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        sample = json.loads(line)
        split = data.splits[sample["split"]]
        ids = prompt_ids(tokenizer, sample["prompt"], chat)
        start = pos[sample["split"]]
        end = start + len(ids)
        if split[start:end].tolist() != ids:
            raise DataError(f"{data.dir}: sample {n}'s tokens do not start with its prompt under this tokenizer "
                            f"(chat template {'on' if chat else 'off'}): distilled with another base or setting")
        while end < len(split) and int(split[end]) not in eos:
            end += 1
        answer = split[start + len(ids) : end + 1].astype(np.int64).tolist()
        pos[sample["split"]] = end + 1
        pairs.append((ids, answer[:-1] if len(answer) - 1 == cap else answer))  # cut: the stored eos was added
    return pairs


def merge(sources: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Concatenate prepared directories (same tokenizer) into one, split by split."""
    metas = [TokenData(s).meta for s in sources]
    if len({(m["dtype"], m["vocab_size"]) for m in metas}) != 1:
        raise DataError("cannot merge data prepared with different tokenizers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        with (out / f"{split}.bin.tmp").open("wb") as f:
            for s in sources:
                f.write((Path(s) / f"{split}.bin").read_bytes())
        (out / f"{split}.bin.tmp").replace(out / f"{split}.bin")
        counts[split] = sum(m["tokens"][split] for m in metas)
    meta = {"dtype": metas[0]["dtype"], "vocab_size": metas[0]["vocab_size"], "tokenizer": metas[0]["tokenizer"],
            "tokens": counts, "sources": [str(s) for s in sources]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
