#!/usr/bin/env python3
"""Fetch freely licensed English text corpora from Debian packages.

Each corpus is built from one or more Debian packages that are downloaded with
``apt-get download`` and unpacked with ``dpkg -x`` into a temporary directory, so
nothing is installed on the system. The text is written as plain UTF-8 files
into the output directory, next to ``LICENSES.md`` (source package, version,
licence, size and SHA-256 of every corpus) and ``sources.json`` (the same facts,
machine readable, kept so that skipped corpora stay listed).

Corpora:

* ``austen``: Jane Austen's six novels, from ``r-cran-janeaustenr`` (an R
  lazy-load database, decoded here with a small reader for R's serialization
  format).
* ``kjv``: the King James Bible, printed by the ``bible`` program of
  ``bible-kjv`` from the data in ``bible-kjv-text``.
* ``pythondoc``: the reST sources of the Python 3.11 documentation.
* ``linuxdoc``: the reST files of the Linux 6.1 kernel ``Documentation/`` tree
  (translations excluded).

Usage: ``python scripts/fetch_corpora.py --out data/corpora``. Standard library
only; needs ``apt-get``, ``dpkg`` and ``dpkg-deb`` (a Debian or Ubuntu system).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


class FetchError(Exception):
    """An expected failure, reported to the user as a single line."""


# ---------------------------------------------------------------------------
# Debian packages


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with captured text output and the C locale; never raises on failure."""
    env = dict(os.environ, LC_ALL="C")
    try:
        return subprocess.run(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise FetchError(f"cannot run {cmd[0]}: {exc.strerror}") from None


def _last_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of a failed command's output (apt's ``E:`` line if any)."""
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit status {proc.returncode}"


class DebianPackages:
    """Downloads and unpacks Debian packages inside a scratch directory."""

    def __init__(self, workdir: Path) -> None:
        """Use ``workdir`` (an existing, empty directory) for downloads."""
        self.workdir = workdir
        self._lists_updated = False

    def download(self, package: str) -> Path:
        """Download ``package`` with ``apt-get download`` and return the path of its ``.deb``.

        If the download fails and we are root, the package lists are refreshed once
        (``apt-get update``) and the download is retried.
        """
        dest = self.workdir / "debs" / package
        dest.mkdir(parents=True, exist_ok=True)
        proc = _run(["apt-get", "download", package], cwd=dest)
        if proc.returncode != 0 and not self._lists_updated and os.geteuid() == 0:
            self._lists_updated = True
            update = _run(["apt-get", "update"])
            if update.returncode != 0:
                raise FetchError(f"apt-get update failed: {_last_error(update)}")
            proc = _run(["apt-get", "download", package], cwd=dest)
        if proc.returncode != 0:
            hint = "" if os.geteuid() == 0 else " (try 'sudo apt-get update' first)"
            raise FetchError(f"apt-get download {package} failed: {_last_error(proc)}{hint}")
        debs = sorted(dest.glob("*.deb"))
        if len(debs) != 1:
            raise FetchError(f"apt-get download {package} left {len(debs)} .deb files in {dest}")
        return debs[0]

    @staticmethod
    def version(deb: Path) -> str:
        """The ``Version`` field of a ``.deb`` file."""
        proc = _run(["dpkg-deb", "-f", str(deb), "Version"])
        if proc.returncode != 0:
            raise FetchError(f"dpkg-deb -f {deb.name} failed: {_last_error(proc)}")
        return proc.stdout.strip()

    @staticmethod
    def extract(deb: Path, root: Path) -> None:
        """Unpack the files of ``deb`` under ``root`` (``dpkg -x``)."""
        proc = _run(["dpkg", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise FetchError(f"dpkg -x {deb.name} failed: {_last_error(proc)}")


# ---------------------------------------------------------------------------
# R serialization (for the janeaustenr lazy-load database)

# SEXP type codes (R Internals, "Serialization formats")
_R_SYMSXP = 1
_R_LISTSXP = 2
_R_CHARSXP = 9
_R_LGLSXP = 10
_R_INTSXP = 13
_R_REALSXP = 14
_R_STRSXP = 16
_R_VECSXP = 19
_R_NILVALUE_SXP = 254
_R_REFSXP = 255
_R_HAS_ATTR, _R_HAS_TAG = 1 << 9, 1 << 10
_R_LATIN1 = 1 << 2  # CHARSXP encoding flag, in the "levels" bits of the item header


class RReader:
    """Reader for the subset of R's XDR serialization format that plain data uses.

    Supports NULL, symbols, pairlists, strings and logical/integer/double/character/list
    vectors. Vectors come back as Python lists (``None`` for ``NA`` strings); a vector
    with a ``names`` attribute comes back as a ``dict`` from name to element. Other
    attributes are dropped. Anything else raises :class:`FetchError`.
    """

    def __init__(self, data: bytes) -> None:
        """Parse the stream header of ``data`` (version 2 or 3, ``X`` format)."""
        if data[:2] != b"X\n":
            raise FetchError("R data is not in XDR serialization format")
        self._data = data
        self._pos = 2
        version = self._int()
        self._pos += 8  # R version that wrote it, oldest R version that can read it
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise FetchError(f"unsupported R serialization version {version}")
        self._refs: list[object] = []

    def _int(self) -> int:
        """Read one big-endian 32-bit signed integer."""
        (value,) = struct.unpack_from(">i", self._data, self._pos)
        self._pos += 4
        return value

    def _take(self, size: int) -> bytes:
        """Read ``size`` raw bytes."""
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def _length(self) -> int:
        """Read a vector length (long vectors are not supported)."""
        length = self._int()
        if length < 0:
            raise FetchError("R long vectors are not supported")
        return length

    def read(self) -> object:
        """Read the next object of the stream."""
        flags = self._int()
        kind = flags & 0xFF
        if kind == _R_NILVALUE_SXP:
            return None
        if kind == _R_REFSXP:
            return self._refs[(flags >> 8 or self._int()) - 1]
        if kind == _R_SYMSXP:
            name = self.read()
            self._refs.append(name)
            return name
        if kind == _R_LISTSXP:
            return self._pairlist(flags)
        if kind == _R_CHARSXP:
            length = self._int()
            if length == -1:
                return None
            encoding = "latin-1" if (flags >> 12) & _R_LATIN1 else "utf-8"
            return self._take(length).decode(encoding)
        if kind in (_R_LGLSXP, _R_INTSXP):
            length = self._length()
            values: list[object] = list(struct.unpack(f">{length}i", self._take(4 * length)))
        elif kind == _R_REALSXP:
            length = self._length()
            values = list(struct.unpack(f">{length}d", self._take(8 * length)))
        elif kind in (_R_STRSXP, _R_VECSXP):
            values = [self.read() for _ in range(self._length())]
        else:
            raise FetchError(f"unsupported R object type {kind}")
        if flags & _R_HAS_ATTR:
            names = dict(self.read()).get("names")
            if names is not None:
                return dict(zip(names, values, strict=True))
        return values

    def _pairlist(self, flags: int) -> list[tuple[object, object]]:
        """Read a pairlist whose first cell has header ``flags``, as (tag, value) pairs."""
        cells = []
        while True:
            if flags & _R_HAS_ATTR:
                self.read()
            tag = self.read() if flags & _R_HAS_TAG else None
            cells.append((tag, self.read()))
            flags = self._int()
            if flags & 0xFF != _R_LISTSXP:
                if flags & 0xFF != _R_NILVALUE_SXP:
                    raise FetchError("unsupported R pairlist (dotted tail)")
                return cells


def read_lazyload_db(base: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``base.rdx`` index plus ``base.rdb`` data).

    The index is a gzip-compressed serialized list whose ``variables`` element maps
    each object name to its (offset, length) in the ``.rdb`` file. Each entry there is a
    4-byte big-endian uncompressed length followed by the compressed serialized object:
    zlib when the index says ``compressed = 1``, otherwise a one-byte codec tag
    (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none) then the payload.
    """
    try:
        index = RReader(gzip.decompress(base.with_suffix(".rdx").read_bytes())).read()
        blob = base.with_suffix(".rdb").read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FetchError(f"cannot read R lazy-load database {base}: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise FetchError(f"unexpected R lazy-load index in {base}.rdx")
    compressed = index["compressed"][0]
    codecs: dict[bytes, Callable[[bytes], bytes]] = {
        b"Z": zlib.decompress,
        b"2": bz2.decompress,
        b"X": lzma.decompress,
        b"0": bytes,
    }
    objects = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[offset : offset + length]
        if compressed == 1:
            payload = zlib.decompress(entry[4:])
        elif entry[4:5] in codecs:
            payload = codecs[entry[4:5]](entry[5:])
        else:
            raise FetchError(f"unknown compression {entry[4:5]!r} for {name} in {base}.rdb")
        objects[name] = RReader(payload).read()
    return objects


# ---------------------------------------------------------------------------
# Corpus builders: each takes the root all of its packages were unpacked into


def _section(title: str, body: str) -> str:
    """A titled block of text: a ``==== title ====`` line, a blank line, then ``body``."""
    return f"==== {title} ====\n\n{body.strip()}\n"


def _join_sections(sections: Iterable[str]) -> str:
    """Join titled blocks with a blank line between them."""
    return "\n".join(sections)


AUSTEN_NOVELS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)


def build_austen(root: Path) -> str:
    """The six novels (publication order) from janeaustenr's lazy-load data."""
    objects = read_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    sections = []
    for key, title in AUSTEN_NOVELS:
        lines = objects.get(key)
        if not isinstance(lines, list) or not all(isinstance(line, str | None) for line in lines):
            raise FetchError(f"janeaustenr data has no character vector named {key!r}")
        sections.append(_section(title, "\n".join(line or "" for line in lines)))
    return _join_sections(sections)


_KJV_HEADING = re.compile(r"^(?P<book>\S.*) (?P<chapter>\d+)$")
_KJV_VERSE = re.compile(r"^\s+\d+ (?P<text>.*)$")


def build_kjv(root: Path) -> str:
    """The whole Bible, one verse per line, a title per book and a blank line between chapters.

    Runs the unpacked ``bible`` program on the unpacked data file with pretty-printing
    on and a line length large enough that no verse is wrapped.
    """
    bible = root / "usr/bin/bible"
    proc = _run([str(bible), "-l", "1000000", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise FetchError(f"{bible.name} program failed: {_last_error(proc)}")
    books: list[tuple[str, list[list[str]]]] = []
    for line in proc.stdout.splitlines():
        if heading := _KJV_HEADING.match(line):
            if not books or books[-1][0] != heading["book"]:
                books.append((heading["book"], []))
            books[-1][1].append([])
        elif verse := _KJV_VERSE.match(line):
            if not books:
                raise FetchError("bible output starts with a verse before any book heading")
            books[-1][1][-1].append(verse["text"].strip())
        elif line.strip():
            raise FetchError(f"unexpected line in bible output: {line[:60]!r}")
    verses = sum(len(chapter) for _, chapters in books for chapter in chapters)
    if verses != 31102:
        raise FetchError(f"bible printed {verses} verses, expected 31102")
    return _join_sections(
        _section(book, "\n\n".join("\n".join(chapter) for chapter in chapters)) for book, chapters in books
    )


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, transparently decompressing ``.gz`` files."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{path} is not UTF-8: {exc}") from None


def _concatenate(base: Path, paths: Iterable[Path], strip_suffix: str) -> str:
    """Concatenate files under ``base``, each titled by its relative path minus ``strip_suffix``."""
    sections = []
    for path in paths:
        title = path.relative_to(base).as_posix().removesuffix(strip_suffix)
        sections.append(_section(title, _read_text(path)))
    if not sections:
        raise FetchError(f"no documents found under {base}")
    return _join_sections(sections)


def build_pythondoc(root: Path) -> str:
    """The reST sources of the Python documentation (``html/_sources/**/*.rst.txt``)."""
    base = root / "usr/share/doc/python3.11/html/_sources"
    return _concatenate(base, sorted(base.rglob("*.rst.txt")), ".txt")


def build_linuxdoc(root: Path) -> str:
    """The English reST files of the kernel ``Documentation/`` tree (``*.rst`` and ``*.rst.gz``)."""
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    paths = sorted(
        path
        for path in base.rglob("*")
        if path.name.endswith((".rst", ".rst.gz"))
        and path.is_file()
        and not path.is_symlink()
        and path.relative_to(base).parts[0] != "translations"
    )
    return _concatenate(base, paths, ".gz")


# ---------------------------------------------------------------------------
# Corpus table, manifest and main


@dataclass(frozen=True)
class Corpus:
    """A corpus: the packages it is built from, its licence and how to build its text."""

    name: str
    packages: tuple[str, ...]
    licence: str
    description: str
    build: Callable[[Path], str]

    @property
    def filename(self) -> str:
        """Name of the output text file."""
        return f"{self.name}.txt"


CORPORA = {
    corpus.name: corpus
    for corpus in (
        Corpus(
            "austen",
            ("r-cran-janeaustenr",),
            "Public domain (novels, published 1811-1817); janeaustenr packaging: MIT",
            "Jane Austen's six completed novels",
            build_austen,
        ),
        Corpus(
            "kjv",
            ("bible-kjv-text", "bible-kjv"),
            "Public domain (King James Version, 1611; Crown rights apply in the UK only)",
            "The King James Bible, one verse per line",
            build_kjv,
        ),
        Corpus(
            "pythondoc",
            ("python3.11-doc",),
            "PSF-2.0 (Python Software Foundation License)",
            "Python 3.11 documentation, reST sources",
            build_pythondoc,
        ),
        Corpus(
            "linuxdoc",
            ("linux-doc-6.1",),
            "GPL-2.0 (some files dual-licensed, see their SPDX-License-Identifier lines)",
            "Linux 6.1 kernel Documentation/, reST files, translations excluded",
            build_linuxdoc,
        ),
    )
}


def _mb(size: int) -> str:
    """A byte count in megabytes, for progress lines."""
    return f"{size / 1e6:.1f} MB"


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(corpus: Corpus, out: Path, packages: DebianPackages) -> dict[str, str]:
    """Build one corpus into ``out`` and print a progress line; return its package versions."""
    start = time.monotonic()
    root = packages.workdir / "root" / corpus.name
    root.mkdir(parents=True)
    versions = {}
    deb_bytes = 0
    for package in corpus.packages:
        deb = packages.download(package)
        versions[package] = packages.version(deb)
        deb_bytes += deb.stat().st_size
        packages.extract(deb, root)
    text = corpus.build(root)
    target = out / corpus.filename
    partial = target.with_name(target.name + ".part")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    shutil.rmtree(root)
    sources = ", ".join(f"{name} {version}" for name, version in versions.items())
    print(
        f"{corpus.name}: {sources} ({_mb(deb_bytes)} .deb) -> {target} "
        f"{_mb(target.stat().st_size)}, {time.monotonic() - start:.1f} s",
        flush=True,
    )
    return versions


def write_licences(out: Path, manifest: dict[str, dict]) -> None:
    """Write ``sources.json`` and ``LICENSES.md`` for every corpus whose text file is in ``out``."""
    rows = []
    for name, corpus in CORPORA.items():
        path = out / corpus.filename
        if not path.exists():
            manifest.pop(name, None)
            continue
        entry = manifest.setdefault(name, {"packages": {}})
        entry.update(file=corpus.filename, licence=corpus.licence, bytes=path.stat().st_size)
        entry["sha256"] = _sha256(path)
        packages = ", ".join(
            f"`{package}` {entry['packages'].get(package, 'unknown (rerun with --force)')}"
            for package in corpus.packages
        )
        rows.append(
            f"| `{corpus.filename}` | {corpus.description} | {packages} | {corpus.licence} "
            f"| {entry['bytes']:,} | `{entry['sha256']}` |"
        )
    (out / "sources.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    header = [
        "# Corpora: sources and licences",
        "",
        "Generated by `scripts/fetch_corpora.py` from Debian packages (fetched with",
        "`apt-get download`, unpacked with `dpkg -x`). Versions are the packages' `Version` fields.",
        "",
        "| File | Content | Debian package and version | Licence | Bytes | SHA-256 |",
        "| --- | --- | --- | --- | ---: | --- |",
    ]
    (out / "LICENSES.md").write_text("\n".join(header + rows) + "\n", encoding="utf-8")


def _corpus_names(value: str) -> list[str]:
    """Parse the ``--only`` argument: comma-separated corpus names."""
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in CORPORA]
    if unknown or not names:
        problem = f"unknown corpus {', '.join(unknown)}" if unknown else "no corpus named"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(CORPORA)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Fetch public text corpora from Debian packages (apt-get download + dpkg -x; "
        "nothing is installed) and write them as UTF-8 text files with a LICENSES.md.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/corpora"),
        help="output directory (created if missing; default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        type=_corpus_names,
        default=list(CORPORA),
        metavar="NAME[,NAME]",
        help=f"build only these corpora (default: all of {', '.join(CORPORA)})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild corpora whose output file already exists (default: skip them)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: build the requested corpora; return the process exit status."""
    args = parse_args(argv)
    try:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        manifest_path = out / "sources.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
        todo = []
        for name in args.only:
            target = out / CORPORA[name].filename
            if target.exists() and not args.force:
                size = _mb(target.stat().st_size)
                print(f"{name}: {target} exists ({size}), skipped (use --force to rebuild)", flush=True)
            else:
                todo.append(CORPORA[name])
        if todo:
            missing = [tool for tool in ("apt-get", "dpkg", "dpkg-deb") if shutil.which(tool) is None]
            if missing:
                raise FetchError(f"{', '.join(missing)} not found: this script needs a Debian-based system")
            with tempfile.TemporaryDirectory(prefix="fetch_corpora-") as workdir:
                packages = DebianPackages(Path(workdir))
                try:
                    for corpus in todo:
                        manifest[corpus.name] = {"packages": fetch(corpus, out, packages)}
                finally:
                    write_licences(out, manifest)  # keep the corpora built before a failure listed
        else:
            write_licences(out, manifest)
    except (FetchError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
