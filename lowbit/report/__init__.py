"""Comparison reports of quantized models: ``lowbit report DIR... --out R``.

:mod:`.collect` reads the folders (``lowbit.json``, ``evals.json``, ``bench.json``), :mod:`.plots`
draws the PNGs, :mod:`.markdown` writes ``report.md``, :mod:`.cli` is the subcommand.
The names below are imported on first use (the CLI registers the subcommand without loading torch).
"""
from ..lazy import lazy

_LAZY = {"Entry": "collect", "collect_fp": "collect", "collect_lowbit": "collect", "pareto_front": "collect",
         "write_report": "cli"}

__all__ = ["Entry", "collect_fp", "collect_lowbit", "pareto_front", "write_report"]


__getattr__, __dir__ = lazy(__name__, _LAZY, __all__)
