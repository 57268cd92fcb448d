"""The ``lowbit quantize`` command that rebuilds a checkpoint, generated from its saved settings.

Nothing here lists flags by hand: the command is derived from lowbit's own parser
(:func:`lowbit.cli.build_parser`) and checked against it.  The saved sections of ``lowbit.json`` are
``config`` (:class:`lowbit.config.QuantConfig`), ``calibration`` (:class:`lowbit.config.CalibConfig`,
``None`` for RTN) and ``qat`` (:class:`lowbit.qat.config.QATConfig`, DL-QAT only).  For every option of
``lowbit quantize`` the setting it feeds is found by name (``--beta`` → ``beta``; ``--no-static-groups``
→ ``static_groups`` inverted; ``--calib`` → ``source``, ``--calib-dtype`` → ``dtype``, ``--one-shot`` →
``squeeze_staged`` inverted) and the flag is written when the saved value differs from what the
parser's defaults give for that method.  The command is then parsed back and turned into configs the
way ``lowbit quantize`` does (:func:`lowbit.cli.quantize_configs`); settings that still differ (a field
no flag sets) are returned so the report can say so instead of printing a wrong command.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shlex

from ..errors import LowbitError

SECTIONS = ("config", "calibration", "qat")
_ALIASES = {"calib": ("source", False), "calib_dtype": ("dtype", False), "one_shot": ("squeeze_staged", True)}
_NOT_SETTINGS = {"help", "model", "out", "json", "quiet", "device", "trust_remote_code", "method"}
_DERIVED = {"calibration": ("fingerprint",)}  # recorded facts about the data, not settings


@functools.lru_cache(maxsize=1)
def quantize_parser() -> argparse.ArgumentParser:
    """The ``quantize`` subparser of lowbit's command line (built once)."""
    from ..cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"]


def saved_settings(meta: dict) -> dict:
    """``{"config": …, "calibration": … or None, "qat": … or None}`` of a ``lowbit.json`` (derived facts removed)."""
    out = {}
    for s in SECTIONS:
        v = meta.get(s)
        out[s] = {k: x for k, x in v.items() if k not in _DERIVED.get(s, ())} if isinstance(v, dict) else None
    return out


def settings_of(argv: list[str], with_calibration: bool = True) -> dict:
    """The settings ``lowbit quantize ARGV`` would save (same shape as :func:`saved_settings`)."""
    from ..cli import build_parser, quantize_configs

    with contextlib.redirect_stderr(io.StringIO()):  # an unparsable command is reported by the caller
        try:
            a = build_parser().parse_args(["quantize", *argv])
        except SystemExit:
            raise LowbitError(f"lowbit's parser refuses: {shlex.join(argv)}") from None
    quant, calib, qat = quantize_configs(a)
    return {"config": quant.to_json(), "calibration": calib.to_json() if with_calibration else None,
            "qat": qat.to_json() if qat is not None else None}


def _setting_of(dest: str, saved: dict) -> tuple[str, str, bool] | None:
    """``(section, field, inverted)`` of the saved setting an option's ``dest`` feeds, or None."""
    field, inverted = _ALIASES.get(dest, (dest, False))
    if dest not in _ALIASES and dest.startswith("no_"):
        field, inverted = dest[3:], True
    for s in SECTIONS:
        if saved.get(s) and field in saved[s]:
            return s, field, inverted
    return None


def _flag(action: argparse.Action, value, inverted: bool) -> list[str]:
    """The command-line words that make ``action`` give ``value`` (``[]`` when it cannot)."""
    opt = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return [opt if value != inverted else "--no-" + opt[2:]]
        return []
    if action.nargs == 0:  # store_true / store_const
        return [opt] if value is (not inverted) else []
    if value is None or isinstance(value, (dict, list)):
        return []
    text = str(value)
    return [f"{opt}={text}"] if text.startswith("-") else [opt, text]


def rebuild_args(meta: dict) -> tuple[list[str], list[str]]:
    """``(argv after 'lowbit quantize' without --out, settings no flag could reproduce)`` for a ``lowbit.json``."""
    saved = saved_settings(meta)
    cfg, src = saved["config"] or {}, meta.get("source") or {}
    model = src.get("alias") or src.get("source") or src.get("path") or "MODEL"
    method = str(meta.get("method") or cfg.get("method") or "gptq")
    calibrated = saved["calibration"] is not None
    argv = [model, "--method", method]
    for key, flag in (("bits", "--bits"), ("group_size", "--group-size")):
        if key in cfg:
            argv += _flag(quantize_parser()._option_string_actions[flag], cfg[key], False)
    if calibrated:
        argv += ["--calib", str(saved["calibration"].get("source", "default"))]
    try:
        default = settings_of([model, "--method", method], calibrated)
    except LowbitError:
        return argv, ["method"]
    emitted = {"method", "bits", "group_size", "source"}
    for action in quantize_parser()._actions:
        if not action.option_strings or action.dest in _NOT_SETTINGS:
            continue
        where = _setting_of(action.dest, saved)
        if where is None:
            continue
        s, field, inverted = where
        if field in emitted:
            continue
        value = saved[s][field]
        if value != (default[s] or {}).get(field):
            words = _flag(action, value, inverted)
            if words:
                argv += words
                emitted.add(field)
    try:
        got = settings_of(argv, calibrated)
    except LowbitError:
        return argv, ["(the command does not parse)"]
    missing = [f"{field}={saved[s][field]!r}" for s in SECTIONS if saved[s] is not None
               for field in saved[s] if (got[s] or {}).get(field) != saved[s][field]]
    return argv, missing


def quantize_command(meta: dict, out: str) -> tuple[str, list[str]]:
    """``(the 'lowbit quantize … --out OUT' shell command, settings it cannot reproduce)``."""
    argv, missing = rebuild_args(meta)
    return shlex.join(["lowbit", "quantize", *argv, "--out", out]), missing
