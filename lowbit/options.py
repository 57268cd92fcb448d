"""Settings described once: a dataclass field made with :func:`option` carries its help text, flag and
choices, from which the CLI flags (:func:`add_flags`), the saved JSON and the report's rebuild command are
generated (the way ``simple-parsing``/``tyro`` derive a command line from dataclasses).

This module imports no other lowbit module at load (and no torch), so :mod:`lowbit.config`, every method
file and the parser can use it.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import Any


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           negate: str | None = None, metavar: str | None = None, type: Any = None) -> Any:
    """A dataclass field with its CLI metadata: ``flag`` (default ``--field-name``), ``help``, ``choices``;
    a boolean is a ``--x/--no-x`` pair, or, with ``negate="--no-x"``, only the flag that turns it off (the
    spelling that exists today; ``flag`` then names the one that turns it on, if any); ``type`` parses the
    command-line string (default: the type of ``default``)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "negate": negate,
                                            "metavar": metavar, "type": type})


def int_range(low: int, high: int | None = None):
    """argparse type: an integer in ``[low, high)`` (a bad value is argparse's one-line error)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if v < low or (high is not None and v >= high):
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}" if high is None else f"{v} must be in {low}..{high - 1}")
        return v
    parse.__name__ = "int"
    return parse


def flag_of(f: Field) -> str:
    """The command-line flag of field ``f`` (``--group-size`` for ``group_size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def change_flag(f: Field, value) -> str:
    """The flag a user gives to set ``f`` to ``value`` (``--no-rht`` for ``rht=False``), for error messages."""
    if isinstance(f.default, bool) and value is False:
        return f.metadata.get("negate") or "--no-" + flag_of(f)[2:]
    return flag_of(f)


def default_of(f: Field):
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def described(cls) -> list[Field]:
    """The fields of ``cls`` that are settings a user gives (made with :func:`option`)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def _help(f: Field, default) -> str:
    text = f.metadata["help"]
    if isinstance(default, bool) or default is None or "default" in text:
        return text.replace("%", "%%")
    return f"{text} (default {default})".replace("%", "%%")


def add_flags(group, cls, only=None, default_text=None, unset: bool = False) -> list[str]:
    """Add one flag per :func:`option` field of ``cls`` (those named in ``only``, if given) to the argparse
    ``group``, stored as ``dest`` = the field name.  A flag not given leaves the field's default in the
    namespace, or ``None`` ("not given") with ``unset`` or when ``default_text(f)`` (the default the help shows)
    differs from it, e.g. a setting whose default depends on the method.  Returns the dests."""
    dests = []
    for f in described(cls):
        if only is not None and f.name not in only:
            continue
        default = default_of(f)
        shown = default_text(f) if default_text else default
        md, flag = f.metadata, flag_of(f)
        given_default = None if unset or (shown is not default and shown != default) else default
        kw: dict = {"dest": f.name, "default": given_default, "help": _help(f, shown)}
        if isinstance(default, bool):
            if md.get("negate"):  # today's spellings: --no-static-groups, --one-shot (turn a default-on setting off)
                kw["help"] = f"{kw['help']} (default on; {md['negate']} turns it off)"
                if md.get("flag"):
                    group.add_argument(flag, action="store_true", **kw)
                    kw["help"] = argparse.SUPPRESS
                group.add_argument(md["negate"], action="store_false", **kw)
            elif default:
                group.add_argument(flag, action=argparse.BooleanOptionalAction,
                                   **{**kw, "help": kw["help"] + " (default on)"})
            else:
                group.add_argument(flag, action="store_true", **kw)
        else:
            parse = md.get("type") or (type(default) if default is not None else str)
            if parse is bool:  # a tri-state setting (None = decided by the method): --x / --no-x
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
                dests.append(f.name)
                continue
            if parse is float:
                from .jsonio import finite_float

                parse = finite_float
            choices = md.get("choices")  # shown, and checked by the dataclass (its one-line LowbitError)
            metavar = md.get("metavar") or (choices and "{" + ",".join(map(str, choices)) + "}")
            group.add_argument(flag, type=parse, metavar=metavar, **kw)
        dests.append(f.name)
    return dests
