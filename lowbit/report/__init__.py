"""Comparison reports of quantized models: ``lowbit report DIR... --out R``.

:mod:`.collect` reads the folders (``lowbit.json``, ``evals.json``, ``bench.json``), :mod:`.plots`
draws the PNGs, :mod:`.markdown` writes ``report.md``, :mod:`.cli` is the subcommand.
"""
from .collect import Entry, collect_fp, collect_lowbit, pareto_front
from .cli import write_report

__all__ = ["Entry", "collect_fp", "collect_lowbit", "pareto_front", "write_report"]
