"""Build chat prompts for self-distillation from the local corpora (scripts/fetch_corpora.py).

Section titles of the Python and Linux documentation become questions ("Explain ...", "How do I ...");
passages of Austen and the King James Bible become summarising, continuing and rewriting tasks.
Prompts are shuffled with a fixed seed and written as JSONL ({"prompt": ...}), one per line. They are
training data, so every corpus is read only before its held-out last 10 % (``recyclegpt.data.corpus_lines``),
the part ``scripts/make_tasks.py`` and the evaluations draw from. (Until 2026-12-03 passages were drawn from
whole files: the model card's step 2 counts what that leaked.)

    python scripts/make_prompts.py --corpora data/corpora --out data/prompts/train.jsonl --n 3000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from recyclegpt.data import corpus_lines

TITLE_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What is {t}? Give a short example.",
    "Write a brief overview of {t} for a beginner.",
    "What are the most important things to know about {t}?",
    "Summarize the main ideas of {t} in a few sentences.",
    "Give me three practical tips about {t}.",
]
PASSAGE_TEMPLATES = [
    "Summarize this passage in two sentences:\n\n{p}",
    "Continue the story:\n\n{p}",
    "Rewrite this passage in plain modern English:\n\n{p}",
    "What is happening in this passage?\n\n{p}",
    "Describe the tone of this passage:\n\n{p}",
]
UNDERLINE = re.compile(r"^([=\-~^*#])\1{3,}\s*$")


def titles(path: Path) -> list[str]:
    """reST section titles of the held-in part: a line of words followed by an underline of = - ~ ^ * #."""
    out = []
    lines = corpus_lines(path, "heldin")
    for prev, line in zip(lines, lines[1:], strict=False):
        t = prev.strip()
        if UNDERLINE.match(line) and 3 <= len(t) <= 70 and t[0].isalpha() and not t.startswith("===="):
            out.append(t.replace("`", "").replace("*", ""))
    return sorted(set(out))


def passages(path: Path, rng: random.Random, n: int) -> list[str]:
    """n passages of 2-4 consecutive non-empty lines (about one paragraph) at random places of the held-in part."""
    lines = [ln.strip() for ln in corpus_lines(path, "heldin")]
    lines = [ln for ln in lines if ln and not ln.startswith("====")]
    out = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 4)
        text = " ".join(lines[i : i + rng.randint(2, 4)])
        out.append(text[:600])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default="data/corpora", help="directory written by fetch_corpora.py")
    ap.add_argument("--out", required=True, help="output JSONL file")
    ap.add_argument("--n", type=int, default=3000, help="number of prompts (default 3000)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = ap.parse_args(argv)
    corpora = Path(args.corpora)
    needed = ["pythondoc.txt", "linuxdoc.txt", "austen.txt", "kjv.txt"]
    missing = [n for n in needed if not (corpora / n).is_file()]
    if missing:
        print(f"error: {corpora} lacks {missing}; run scripts/fetch_corpora.py first", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    topics = titles(corpora / "pythondoc.txt") + titles(corpora / "linuxdoc.txt")
    prompts = [rng.choice(TITLE_TEMPLATES).format(t=t) for t in topics]
    rng.shuffle(prompts)
    n_titles = args.n * 2 // 3
    prompts = prompts[:n_titles]
    per = (args.n - len(prompts)) // 2 + 1
    for name in ("austen.txt", "kjv.txt"):
        prompts += [rng.choice(PASSAGE_TEMPLATES).format(p=p) for p in passages(corpora / name, rng, per)]
    rng.shuffle(prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for p in prompts[: args.n]:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {min(len(prompts), args.n)} prompts to {out} ({len(topics)} titles available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
