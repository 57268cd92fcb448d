"""Text sources: ``default``, a file (.txt, .md, .jsonl), a folder of them, or a HF dataset spec.

``read_text(source, split=...)`` always returns one string; documents are joined by blank lines.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError
from .corpus import shakespeare, strip_markdown

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"text file '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise LowbitError(f"text file '{path}': cannot read ({e.strerror})") from None


def _read_jsonl(path: Path, field: str) -> str:
    docs = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"'{path}' line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise LowbitError(f"'{path}' line {i}: no string field '{field}'")
        docs.append(record[field])
    return "\n\n".join(docs)


def _read_file(path: Path, field: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    text = _read_utf8(path)
    return strip_markdown(text) if suffix in (".md", ".markdown") else text


def _read_dataset(spec: str, field: str) -> str:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split or "train")
        return "\n\n".join(t for t in ds[field] if t)
    except Exception as e:  # not installed, offline, unknown name: all mean the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LowbitError(f"text source '{spec}': not a file or folder, and loading it as a Hugging Face "
                          f"dataset failed: {reason}") from None


def read_text(source: str, *, split: str = "eval", field: str = "text") -> str:
    """The text of ``source``; ``default`` is the embedded corpus's ``split`` ("calib" or "eval")."""
    if source == "default":
        text = shakespeare(split)
    else:
        path = Path(source)
        if path.is_file():
            text = _read_file(path, field)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise LowbitError(f"text folder '{source}' has no {', '.join(TEXT_SUFFIXES)} files")
            text = "\n\n".join(_read_file(p, field) for p in files)
        elif source.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES + (".json",):
            raise LowbitError(f"text source '{source}' not found")
        else:
            text = _read_dataset(source, field)
    if not text.strip():
        raise LowbitError(f"text source '{source}' is empty")
    return text
