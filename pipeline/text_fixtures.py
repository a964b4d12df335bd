"""Text fixtures beyond Austen: an off-domain prose text, a code text and the calibration mix.

* ``fixture:kjv`` — the King James Bible (public domain), from the Debian packages
  ``bible-kjv`` / ``bible-kjv-text`` (its compressed text read out by their ``bible`` program),
  verse numbers dropped, one paragraph per chapter. Another author, era (1611) and genre
  (scripture) than Austen: the off-domain text every quality figure is scored on.
* ``fixture:code/python-stdlib`` — :data:`CODE_EVAL_FILES` of Python's standard library,
  concatenated in that order, each under a ``# file:`` line: the off-domain text of code models.
* ``fixture:calib-mix`` — the default calibration text (:func:`calib_mix`): equal shares of
  fiction (Austen's *Emma*, *Pride and Prejudice*, *Northanger Abbey*), quotations, aphorisms,
  poetry and jokes by many authors (Debian ``fortunes``: :data:`MIX_FORTUNES`) and code
  (:data:`MIX_CODE_FILES` of the standard library), interleaved in pieces of :data:`MIX_PIECE`
  characters so that evenly spaced windows draw from every source. It holds neither held-out
  text (*Persuasion*, *Mansfield Park*, the KJV, :data:`CODE_EVAL_FILES`).
* ``fixture:calib-code`` — the mix weighted for a code model: half its fiction and half its
  quotations, and the same code in two streams of three files: code is 45 % of the characters
  (43 % of Qwen2.5-Coder's tokens, against 27 % in the mix). It holds no held-out text either.

Each text is pinned by SHA-256 (the standard library's by the Python version it was built
from); a mismatch is a FixtureError, never a silently different text.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from functools import partial
from pathlib import Path

from strata_quant.pipeline.fixtures import FixtureError, apt_install, austen, text_path

KJV_SHA256 = "54e826a579c9a22082ac1ce185e15753673a025fb98f0e291e150ad4cc88d74e"
# the code texts are pinned per CPython version (the standard library's source changes with it)
CODE_SHA256 = {(3, 11, 7): "801e207a6fd1199fb64d21aa215d2a9324320efda176de355a032959c9fd6529"}
MIX_SHA256 = {
    "calib-mix": {(3, 11, 7): "090e621b1501ca732ba412bb816af2e59cde45bdb1b101699f17a90ff8812f76"},
    "calib-code": {(3, 11, 7): "ea224035e9896185399f6bf5b1dc173d2878ac094a47d457d034624ea13e7b28"},
}
CODE_EVAL_FILES = ("argparse.py", "textwrap.py", "heapq.py", "functools.py")
MIX_CODE_FILES = ("dataclasses.py", "pathlib.py", "shutil.py", "tokenize.py", "csv.py", "ast.py")
MIX_NOVELS = ("emma", "prideprejudice", "northangerabbey")
MIX_FORTUNES = ("literature", "humorists", "wisdom", "people", "science", "politics", "songs-poems", "art")
MIX_SHARE = 300_000  # characters of each source in the mix
MIX_PIECE = 4_000  # characters per interleaved piece
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _pinned(name: str) -> str:
    if name == "kjv":
        return KJV_SHA256
    table = CODE_SHA256 if name == "code/python-stdlib" else MIX_SHA256[name]
    version = tuple(sys.version_info[:3])
    if version not in table:
        raise FixtureError(
            f"fixture:{name} is pinned for Python {', '.join('.'.join(map(str, v)) for v in table)}, "
            f"this is {'.'.join(map(str, version))}"
        )
    return table[version]


def _write_pinned(name: str, text: str) -> Path:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != _pinned(name):
        raise FixtureError(f"fixture:{name} built with SHA-256 {digest}, pinned {_pinned(name)}")
    target = text_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".part").write_text(text, encoding="utf-8")
    os.replace(target.with_suffix(".part"), target)
    return target


def kjv_text(raw: str) -> str:
    """``bible -l0`` output → one paragraph per chapter under its heading, verse numbers dropped."""
    chapters: list[str] = []
    verses: list[str] = []
    for line in raw.splitlines():
        verse = re.match(r"\s+\d+ (.*)", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip():
            if verses:
                chapters.append(" ".join(verses))
                verses = []
            chapters.append(line.strip())
    if verses:
        chapters.append(" ".join(verses))
    return "\n\n".join(chapters) + "\n"


def kjv() -> Path:
    target = text_path("kjv")
    if target.is_file() and target.stat().st_size > 0:
        return target
    if shutil.which("bible") is None:
        apt_install(["bible-kjv", "bible-kjv-text"])
    done = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not done.stdout.strip():
        raise FixtureError(f"could not read the KJV with bible: {done.stderr[-500:]}")
    return _write_pinned("kjv", kjv_text(done.stdout))


def _stdlib_files(files: tuple[str, ...]) -> str:
    root = Path(sysconfig.get_path("stdlib"))
    return "".join(f"# file: {f}\n{(root / f).read_text(encoding='utf-8')}\n" for f in files)


def python_stdlib() -> Path:
    target = text_path("code/python-stdlib")
    if target.is_file() and target.stat().st_size > 0:
        return target
    return _write_pinned("code/python-stdlib", _stdlib_files(CODE_EVAL_FILES))


def interleave(sources: list[str], share: int, piece: int) -> str:
    """The first ``share`` characters of each source, cut into ``piece``-character pieces (at the
    next line end) and taken round-robin, so every stretch of the result holds every source."""
    cut: list[list[str]] = []
    for text in sources:
        text, parts, at = text[:share], [], 0
        while at < len(text):
            end = text.find("\n", at + piece)
            end = len(text) if end < 0 else end + 1
            parts.append(text[at:end])
            at = end
        cut.append(parts)
    out = []
    for i in range(max(len(p) for p in cut)):
        out.extend(parts[i] for parts in cut if i < len(parts))
    return "".join(out)


#: each mix's streams: (source, characters taken from it, its files or texts). A stream takes an
#: equal part of its characters from each of its texts; the streams are interleaved piece by piece.
MIXES = {
    "calib-mix": (("fiction", MIX_SHARE, MIX_NOVELS), ("quotes", MIX_SHARE, MIX_FORTUNES),
                  ("code", MIX_SHARE, MIX_CODE_FILES)),
    "calib-code": (("fiction", MIX_SHARE // 2, MIX_NOVELS), ("quotes", MIX_SHARE // 2, MIX_FORTUNES),
                   ("code", MIX_SHARE // 2, MIX_CODE_FILES[:3]), ("code", MIX_SHARE // 2, MIX_CODE_FILES[3:])),
}  # fmt: skip


def _source_texts(kind: str, names: tuple[str, ...]) -> list[str]:
    if kind == "fiction":
        return [austen(n).read_text() for n in names]
    if kind == "quotes":  # fortune files separate their entries with "%" lines: keep the entries, drop the marks
        return [(FORTUNES_DIR / f).read_text(encoding="utf-8").replace("\n%\n", "\n\n") for f in names]
    return [_stdlib_files((f,)) for f in names]


def mixed_text(name: str) -> Path:
    """The calibration mix ``name`` (one of :data:`MIXES`), built and pinned on first use."""
    target = text_path(name)
    if target.is_file() and target.stat().st_size > 0:
        return target
    if not all((FORTUNES_DIR / f).is_file() for f in MIX_FORTUNES):
        apt_install(["fortunes"])
    streams = []
    for kind, share, names in MIXES[name]:
        texts = _source_texts(kind, names)
        streams.append("\n".join(t[: share // len(texts)] for t in texts)[:share])
    return _write_pinned(name, interleave(streams, max(s for _, s, _ in MIXES[name]), MIX_PIECE))


FETCH = {"kjv": kjv, "code/python-stdlib": python_stdlib} | {name: partial(mixed_text, name) for name in MIXES}
