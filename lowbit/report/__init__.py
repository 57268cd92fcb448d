"""Comparison reports of quantized models: ``lowbit report DIR... --out R``.

:mod:`.collect` reads the folders (``lowbit.json``, ``evals.json``, ``bench.json``), :mod:`.plots`
draws the PNGs, :mod:`.markdown` writes ``report.md``, :mod:`.cli` is the subcommand.
The names below are imported on first use (the CLI registers the subcommand without loading torch).
"""
_LAZY = {"Entry": "collect", "collect_fp": "collect", "collect_lowbit": "collect", "pareto_front": "collect",
         "write_report": "cli"}

__all__ = ["Entry", "collect_fp", "collect_lowbit", "pareto_front", "write_report"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit.report' has no attribute {name!r}")
