"""Output paths: checked before the work, never someone else's, and complete or absent.

Every command checks each of its outputs first (:func:`check_file`, :func:`check_folder`), so a bad
``--out`` or ``--json`` fails in a second instead of after the work, and writes it last, through a
temporary sibling renamed into place (:func:`write_texts`; folders: :func:`lowbit.packed.checkpoint.swap_into_place`),
so on any failure nothing new is left on disk: no temporary, no half-written file, no parent folder made for it.

What may be replaced: an existing *file* only with ``--force``; an existing *folder* when it is empty or
lowbit's own kind of output (``ours``: a checkpoint, a report), else only with ``--force``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import LowbitError

FORCE_HINT = "--force replaces it"


def _named(flag: str | None, path: Path) -> str:
    return f"{flag} '{path}'" if flag else str(path)


def probe(path: str | os.PathLike, flag: str | None = None) -> None:
    """``path``'s nearest existing ancestor must be a folder lowbit can write in.  Tested by making and
    removing a temporary folder there (the only test that also holds for root and read-only mounts);
    no folder is created on the way."""
    p = Path(os.path.abspath(path))
    parent = p.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"{_named(flag, Path(path))}: cannot write there ('{parent}' is not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{p.name}.probe-", dir=parent))
    except OSError as e:
        raise LowbitError(f"{_named(flag, Path(path))}: cannot write there ({e.strerror or e})") from None


def check_file(path: str | os.PathLike, flag: str | None = None, force: bool = False) -> None:
    """Before the work: ``path`` may be written as a file (a folder is refused, an existing file needs ``force``)."""
    p = Path(path)
    if p.is_dir():
        raise LowbitError(f"{_named(flag, p)} is a folder; give the path of the file to write")
    if (p.exists() or p.is_symlink()) and not force:
        raise LowbitError(f"{_named(flag, p)} exists; refusing to overwrite it ({FORCE_HINT})")
    probe(p, flag)


def check_folder(path: str | os.PathLike, flag: str | None, ours: Callable[[Path], bool], what: str,
                 force: bool = False, probe_parent: bool = True) -> None:
    """Before the work: ``path`` may be written as a folder: absent, empty, ``ours(path)`` (lowbit's own
    ``what``, replaced whole), or anything with ``force``."""
    p = Path(path)
    if p.exists() and not force and not (p.is_dir() and (ours(p) or not any(p.iterdir()))):
        raise LowbitError(f"{_named(flag, p)} exists and is not {what}; refusing to overwrite it ({FORCE_HINT})")
    if probe_parent:
        probe(p, flag)


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder`` -> the folders it created, outermost first (for :func:`remove_made`)."""
    missing = []
    f = Path(os.path.abspath(folder))
    while not f.exists():
        missing.append(f)
        f = f.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def remove_made(made: Iterable[Path]) -> None:
    """Remove the folders :func:`make_parents` created (innermost first), where they are still empty."""
    for d in reversed(list(made)):
        try:
            d.rmdir()
        except OSError:
            pass


def remove(path: Path) -> None:
    """Delete a file or a folder tree (a replaced output)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_texts(files: list[tuple[str | os.PathLike, str, str | None]], force: bool = True) -> None:
    """Write ``[(path, text, flag)]`` together: each into a temporary sibling, then all renamed into place.
    On any failure every temporary and every folder made for them is removed, and no ``path`` changed
    (unless the last renames themselves fail).  ``force=False`` re-checks that no ``path`` is an existing file."""
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    flag, p = None, None
    try:
        for path, text, flag in files:
            p = Path(path)
            if not force and p.exists():
                raise LowbitError(f"{_named(flag, p)} exists; refusing to overwrite it ({FORCE_HINT})")
            if p.is_dir():
                raise LowbitError(f"{_named(flag, p)} is a folder; give the path of the file to write")
            made += make_parents(p.parent)
            fd, name = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
            staged.append((Path(name), p))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(name, 0o666 & ~_umask())  # mkstemp makes it private; an output is an ordinary file
        for tmp, p in staged:
            os.replace(tmp, p)
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        remove_made(made)
        raise LowbitError(f"{_named(flag, p)}: cannot write ({e.strerror or e})") from None
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        remove_made(made)
        raise
