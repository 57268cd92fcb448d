"""The ``lowbit quantize`` command that rebuilds a checkpoint, generated from its saved settings.

Nothing here lists flags by hand: the command is derived from lowbit's own parser
(:func:`lowbit.cli.build_parser`, itself generated from the settings' dataclasses) and checked against it.
The saved sections of ``lowbit.json`` are ``config`` (:class:`lowbit.config.QuantConfig`: the grid and the
method's options; an old ``lowbit.json`` listed every method's settings, the ones that do not apply are
dropped), ``calibration`` (:class:`lowbit.config.CalibConfig`, ``None`` for RTN) and ``qat``
(:class:`lowbit.qat.config.QATConfig`, DL-QAT only).  Every option of ``lowbit quantize`` stores into the
setting of its name (``dest``), so a flag is written when the saved value differs from what the method's
defaults give.  The command is then parsed back and turned into configs the way ``lowbit quantize`` does
(:func:`lowbit.cli.quantize_configs`); settings that still differ (a field no flag sets) are returned so the
report can say so instead of printing a wrong command.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shlex

from ..errors import LowbitError

SECTIONS = ("config", "calibration", "qat")
_NOT_SETTINGS = {"help", "model", "out", "json", "quiet", "device", "trust_remote_code", "method", "force"}
_DERIVED = {"calibration": ("fingerprint",)}  # recorded facts about the data, not settings


@functools.lru_cache(maxsize=1)
def quantize_parser() -> argparse.ArgumentParser:
    """The ``quantize`` subparser of lowbit's command line (built once, its deferred flags added)."""
    from ..cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"].ready()


def saved_settings(meta: dict) -> dict:
    """``{"config": …, "calibration": … or None, "qat": … or None}`` of a ``lowbit.json`` (derived facts and
    settings that do not apply to its method removed)."""
    from ..config import applicable, known_settings

    out = {}
    for s in SECTIONS:
        v = meta.get(s)
        out[s] = {k: x for k, x in v.items() if k not in _DERIVED.get(s, ())} if isinstance(v, dict) else None
    if out["config"] is not None:  # a setting no method knows (a newer lowbit's) stays, to be named as missing
        cfg, known = out["config"], known_settings()
        out["config"] = {**applicable(cfg, meta.get("method")), **{k: v for k, v in cfg.items() if k not in known}}
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


def _section_of(dest: str, saved: dict) -> str | None:
    """The saved section that holds the setting ``dest``, or None."""
    return next((s for s in SECTIONS if saved.get(s) and dest in saved[s]), None)


def _flag(action: argparse.Action, value) -> list[str]:
    """The command-line words that make ``action`` store ``value`` (``[]`` when it cannot)."""
    opt = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse.BooleanOptionalAction):
        return [opt if value else "--no-" + opt[2:]] if isinstance(value, bool) else []
    if action.nargs == 0:  # store_true / store_false / store_const
        return [opt] if value is action.const else []
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
    parser = quantize_parser()
    for key, flag in (("bits", "--bits"), ("group_size", "--group-size")):
        if key in cfg:
            argv += _flag(parser._option_string_actions[flag], cfg[key])
    if calibrated:
        argv += _flag(parser._option_string_actions["--calib"], saved["calibration"].get("source", "default"))
    try:
        default = settings_of([model, "--method", method], calibrated)
    except LowbitError:
        return argv, ["method"]
    emitted = {"method", "bits", "group_size", "source"}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_SETTINGS or action.dest in emitted:
            continue
        s = _section_of(action.dest, saved)
        if s is None:
            continue
        value = saved[s][action.dest]
        if value != (default[s] or {}).get(action.dest):
            words = _flag(action, value)
            if words:
                argv += words
                emitted.add(action.dest)
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
