"""Compiled inner loop of the column-feedback engine on a uniform integer grid (GPTQ, FOEM; CPU).

:func:`lowbit.solvers.feedback.column_feedback` quantizes one column at a time through a Python callback:
about fifteen small tensor operations per column, which on the demo model cost more than the arithmetic
(≈ 50 µs per column whatever its height; 5 000 columns per block).  When the grid is the uniform one of
:mod:`lowbit.solvers.gptq` (per-row ``scale``/``zero`` per group, no kept outliers) the engine hands a whole
lazy block to :func:`uniform_columns` instead: the C++ loop (``csrc/feedback_cpu.cpp``) runs the same float32
operations in the same order, rows split over threads, and is bit-identical to the Python path
(``tests/test_solvers.py`` compares them; ``LOWBIT_KERNELS=reference`` forces the Python path).

Built on first use like the inference kernels (:mod:`.build`, ``-O3 -march=native -fopenmp -ffp-contract=off``);
when it cannot be built the engine runs the Python loop, with the same results.
"""
from __future__ import annotations

import torch

from .build import Extension

EXT = Extension("feedback_cpu", "feedback_cpu.cpp", ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
                "column-feedback kernel")


def available() -> bool:
    """Whether the compiled loop can be used in this process (compiles it on the first call)."""
    return EXT.available()


def unavailable_reason() -> str | None:
    return EXT.reason()


def describe() -> str:
    return "uniform-grid GPTQ/FOEM column loop (OpenMP over rows)"


def usable(Wt: torch.Tensor) -> bool:
    """Whether the kernel applies to the working copy ``Wt``: float32 on the CPU, the kernels backend not
    ``"reference"``, and the extension builds."""
    from .dispatch import backend

    return Wt.device.type == "cpu" and Wt.dtype == torch.float32 and backend() != "reference" and available()


def uniform_columns(Wt, W0t, U, scales, zeros, group_of, E, b0: int, b1: int, c0: int, c1: int, maxq: float,
                    beta: float, pull_start: int = 0) -> None:
    """Quantize positions ``[c0, c1)`` of the lazy block ``[b0, b1)`` in place (see ``csrc/feedback_cpu.cpp``):
    ``Wt`` (n, m) working copy, ``W0t`` (n, m) FOEM's originals (any tensor when ``beta = 0``), ``U`` (n, n),
    ``scales``/``zeros`` (m, G), ``group_of`` (n,) int64 group of each position, ``E`` (≥ b1 − b0, m) the
    block's fed-back errors (row ``j − b0``).  FOEM's pull-back is applied to positions ``≥ pull_start``."""
    EXT.load().uniform_columns(Wt, W0t, U, scales, zeros, group_of, E, b0, b1, c0, c1, float(maxq), float(beta),
                               pull_start)
