"""The documentation checks itself: README.md and docs/*.md link only to files and headings that exist,
the README stays short, and every command line it shows parses with the real CLI.

No model is loaded: command lines are checked with ``build_parser().parse_args`` (a ``--help``-level dry
run), the Python quick start by compiling it and binding its calls to the real signatures.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


# ----------------------------------------------------------------------------------------------------------
# Markdown helpers


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks (those are code, not links or headings)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def code_blocks(text: str, langs: tuple[str, ...] = ("bash", "sh", "")) -> list[str]:
    """The text of every fenced block whose language is one of ``langs`` (no language counts as shell)."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if FENCE.match(stripped):
            if current is None:
                current, lang = [], stripped[3:].strip()
            else:
                if lang in langs:
                    blocks.append("\n".join(current))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


def section(text: str, title: str) -> str:
    """The text under the heading ``title`` (any level), up to the next heading of the same or higher level."""
    lines, out, level = text.splitlines(), [], None
    fenced = False
    for line in lines:
        if FENCE.match(line.strip()):
            fenced = not fenced
        m = None if fenced else HEADING.match(line)
        if m and level is None and m.group(2).strip() == title:
            level = len(m.group(1))
            continue
        if m and level is not None and len(m.group(1)) <= level:
            break
        if level is not None:
            out.append(line)
    assert level is not None, f"no heading {title!r}"
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation other than '-' and
    '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file or heading does not exist."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = path if not file_part else (path.parent / file_part).resolve()
            if not dest.exists():
                problems.append(f"{path.name}: {target} -> no file {dest}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}: {target} -> no heading #{anchor} in {dest.name}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Shell helpers: the README's command blocks, as the CLI would receive them


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuation lines joined, comments dropped, and a
    ``for NAME in WORD...; do ... done`` loop unrolled with ``$NAME``, ``${NAME}``, ``${NAME#*:}`` and
    ``${NAME%%:*}`` substituted (the only expansions the README uses; anything else fails loudly)."""
    joined = re.sub(r"\\\n", " ", block)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    out: list[list[str]] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^for (\w+) in (.*?); do$", lines[i])
        if m:
            name, words = m.group(1), shlex.split(m.group(2))
            end = lines.index("done", i)
            body = lines[i + 1 : end]
            for word in words:
                for line in body:
                    out.extend(shell_commands(expand(line, name, word)))
            i = end + 1
            continue
        out.extend(split_commands(lines[i]))
        i += 1
    return out


def split_commands(line: str) -> list[list[str]]:
    """One shell line split into commands at ``;``, ``&&``, ``||`` and ``|``, each cut at its first
    redirection (``> file`` is not an argument)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, current = [], []
    for token in lex:
        if token in (";", "&&", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    cut = []
    for argv in commands:
        stop = next((i for i, a in enumerate(argv) if a in (">", ">>", "<", ">&", "&>")), len(argv))
        if argv[:stop]:
            cut.append(argv[:stop])
    return cut


def expand(line: str, name: str, value: str) -> str:
    """``line`` with the loop variable ``name`` replaced by ``value`` in the forms the README uses."""
    forms = {
        "${" + name + "#*:}": value.split(":", 1)[1] if ":" in value else value,
        "${" + name + "%%:*}": value.split(":", 1)[0],
        "${" + name + "}": value,
    }
    for form, repl in forms.items():
        line = line.replace(form, repl)
    line = re.sub(r"\$" + name + r"\b", value, line)
    assert "$" not in line.replace("$RECYCLEGPT", ""), f"unsupported shell expansion in {line!r}"
    return line


def recyclegpt_argvs(text: str) -> list[list[str]]:
    """Every ``recyclegpt ...`` command in the bash blocks of ``text``, without the leading word."""
    argvs = []
    for block in code_blocks(text):
        for argv in shell_commands(block):
            if argv and argv[0] == "recyclegpt":
                argvs.append(argv[1:])
    return argvs


def parse_error(argv: list[str]) -> str | None:
    """None if the real CLI parses ``argv``; else argparse's message."""
    import contextlib
    import io

    from recyclegpt.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


# ----------------------------------------------------------------------------------------------------------
# The checks


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_docs_pages_exist():
    names = {p.name for p in DOCS}
    for page in ("decoding.md", "training.md", "evaluation.md", "serving.md", "performance.md", "results.md",
                 "architecture.md"):
        assert page in names


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move depth to docs/)"


def test_quick_start_commands_parse():
    quick = section(README.read_text(encoding="utf-8"), "Quick start")
    argvs = recyclegpt_argvs(quick)
    assert len(argvs) >= 5, "the quick start should show the main commands"
    problems = [f"recyclegpt {shlex.join(a)}: {err}" for a in argvs if (err := parse_error(a))]
    assert problems == []


def test_every_readme_command_parses():
    argvs = recyclegpt_argvs(README.read_text(encoding="utf-8"))
    problems = [f"recyclegpt {shlex.join(a)}: {err}" for a in argvs if (err := parse_error(a))]
    assert problems == []


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, flags=re.M))
    named = set()
    for block in code_blocks(README.read_text(encoding="utf-8")):
        for argv in shell_commands(block):
            if argv and argv[0] == "make":
                named.update(a for a in argv[1:] if not a.startswith("-") and "=" not in a)
    assert {"demo", "test"} <= named
    assert named <= targets, f"make targets named in README.md but not in the Makefile: {named - targets}"


def test_quick_start_python_matches_the_api():
    import recyclegpt
    from recyclegpt.generate import Engine

    quick = section(README.read_text(encoding="utf-8"), "Quick start")
    (code,) = code_blocks(quick, langs=("python",))
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "recyclegpt":
            for alias in node.names:
                assert hasattr(recyclegpt, alias.name), f"recyclegpt has no {alias.name}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = {"load": recyclegpt.load, "generate": Engine.generate, "stream": Engine.stream,
                      "SamplingConfig": recyclegpt.SamplingConfig}.get(name)
            if target is None:
                continue
            params = inspect.signature(target).parameters
            for kw in node.keywords:
                assert kw.arg in params, f"{name}() takes no {kw.arg}= (README quick start)"


# ----------------------------------------------------------------------------------------------------------
# The checkers themselves must be able to fail


def test_checker_catches_a_bad_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n[ok](b.md#part-one) [missing](nope.md) [bad anchor](b.md#nope)\n")
    (tmp_path / "b.md").write_text("# B\n\n## Part one\n\n```\n# not a heading\n```\n")
    problems = broken_links(tmp_path / "a.md")
    assert len(problems) == 2
    assert "nope.md" in problems[0] and "#nope" in problems[1]


def test_checker_catches_a_bad_option():
    assert parse_error(["generate", "--prompt", "x", "--strategy", "verified"]) is None
    assert parse_error(["generate", "--prompt", "x", "--no-such-option"]) is not None
    assert parse_error(["generate", "--prompt", "x", "--strategy", "nonsense"]) is not None


def test_slugs_follow_github():
    assert github_slug("AMD EPYC: side candidates (`--draft-width`)") == "amd-epyc-side-candidates---draft-width"
    assert github_slug("The 0.70 agreement bar on held-out answers") == "the-070-agreement-bar-on-held-out-answers"
    assert github_slug("The paper's claims at small scale") == "the-papers-claims-at-small-scale"


def test_loops_are_unrolled():
    block = 'for run in "a:--prepack" "b:--dtype bfloat16"; do\n  recyclegpt bench --json x_${run%%:*}.json \\\n' \
            '      ${run#*:}\ndone'
    assert recyclegpt_argvs(f"```bash\n{block}\n```\n") == [
        ["bench", "--json", "x_a.json", "--prepack"], ["bench", "--json", "x_b.json", "--dtype", "bfloat16"]]
