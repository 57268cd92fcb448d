"""Text sources: ``default``, a file (.txt, .md, .jsonl), a folder of them, or a HF dataset spec.

``read_text(source, split=...)`` always returns one string; documents are joined by blank lines.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError
from .corpus import SPLITS, shakespeare, strip_markdown

FOLDER_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl")  # the files read from a folder
_DATASET_SPLIT = {"calib": "train", "eval": "test"}        # HF split used when the spec names none


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"text file '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise LowbitError(f"text file '{path}': cannot read it ({e.strerror})") from None


def _field(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise LowbitError(f"{where}: no string field '{field}'")
    return record[field]


def _read_jsonl(path: Path, field: str) -> str:
    """One JSON record per line (a ``.json`` file holding one list of records also works)."""
    text = _read_utf8(path)
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return "\n\n".join(_field(r, field, f"'{path}' record {i}") for i, r in enumerate(whole))
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"'{path}' line {i}: not valid JSON ({e.msg})") from None
        docs.append(_field(record, field, f"'{path}' line {i}"))
    return "\n\n".join(docs)


def _read_file(path: Path, field: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    text = _read_utf8(path)
    return strip_markdown(text) if suffix in (".md", ".markdown") else text


def _read_folder(path: Path, field: str) -> str:
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise LowbitError(f"text folder '{path}' has no {', '.join(FOLDER_SUFFIXES)} files")
    return "\n\n".join(_read_file(p, field).strip("\n") for _, p in files)


def _read_dataset(spec: str, split: str, field: str) -> str:
    name, config, ds_split = (spec.split(":", 2) + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=ds_split or _DATASET_SPLIT[split])
        if field not in ds.column_names:
            raise ValueError(f"no column '{field}' (columns: {', '.join(ds.column_names)})")
        return "\n\n".join(t for t in ds[field] if t)
    except Exception as e:  # not installed, offline, unknown name: all mean the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LowbitError(f"text source '{spec}': not a file or folder, and loading it as a Hugging Face "
                          f"dataset failed: {reason}") from None


def read_text(source: str, *, split: str = "eval", field: str = "text") -> str:
    """The text of ``source`` as one string.

    ``"default"``: the embedded corpus's ``split`` ("calib" or "eval").  A file: ``.txt`` as is,
    ``.md``/``.markdown`` stripped of markup, ``.jsonl``/``.json`` the ``field`` of each record,
    anything else as UTF-8 text.  A folder: its .txt/.md/.markdown/.jsonl files, sorted by relative path.
    Otherwise a Hugging Face dataset ``name[:config][:split]`` (split defaults to train for
    "calib", test for "eval").  Documents are joined by blank lines."""
    if split not in SPLITS:
        raise LowbitError(f"text split must be 'calib' or 'eval', not {split!r}")
    if source == "default":
        text = shakespeare(split)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            text = _read_file(path, field)
        elif path.is_dir():
            text = _read_folder(path, field)
        elif source.startswith((".", "/", "~")) or path.suffix.lower() in FOLDER_SUFFIXES + (".json",):
            raise LowbitError(f"text source '{source}': no such file or folder")
        else:
            text = _read_dataset(source, split, field)
    if not text.strip():
        raise LowbitError(f"text source '{source}' is empty")
    return text
