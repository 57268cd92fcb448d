"""QuIP# (arXiv 2402.04396): randomized Hadamard incoherence on both sides, BlockLDLQ with the E8P lattice
codebook (residual stages for 3/4 bits); optional per-block fine-tuning of signs and scales.  Solver:
:func:`lowbit.solvers.quip.solve`; fine-tuning: :func:`lowbit.calib.finetune.block_finetuner` ("quip").

**On a GGUF type** (``--gguf-type IQ2_XS``, and IQ2_XXS, IQ2_S, IQ3_XXS, IQ3_S, or a llama.cpp preset whose main type
is one of them: ``MOSTLY_IQ2_XS``, ``IQ2_M``, ``IQ3_M``…): llama.cpp cannot undo a per-layer randomized Hadamard
transform, so the incoherence comes from the residual rotation instead (``--rotate``, :mod:`lowbit.models.rotate`,
on by default here; the rotation inside the MLP and attention is not available), and BlockLDLQ runs on the type's
own grid: the column-feedback engine with unit 8 (:func:`lowbit.gguf.solve._vector_feedback`, nearest point of the
type's 8-dimensional grid with its sign parity, the error fed back through ``U_kk⁻¹``), damped as QuIP# is
(``--damp``).  Tensors that a preset gives a scalar type, or whose rows fall back (IQ4_NL), get unit 1: LDLQ on
that grid, which is GPTQ's loop.  So ``--method quip --gguf-type T`` = ``--method gptq --gguf-type T --rotate``.
What cannot apply is refused in one line: the E8P codebook, ``--no-rht``, ``--rht-seed``, ``--no-scale-search``
(the type fits its own block scales), ``--finetune``; and a scalar ``--gguf-type`` (Q4_0, Q4_K, IQ4_NL…), where
QuIP# has no grid of its own to add: use ``--method gptq --rotate`` there."""
from dataclasses import dataclass, fields

from ..errors import LowbitError
from ..options import change_flag, default_of
from ..solvers import quip
from .base import FinetuneOptions, MethodSpec, finetuner, option, register

def vector_types() -> tuple[str, ...]:
    """The GGUF types of 8-dimensional vector grids (codec unit 8: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)."""
    from ..gguf import TYPES

    return tuple(n for n, t in TYPES.items() if t.codec.unit > 1)


def main_type(gguf_type: str) -> str:
    """The GGUF type a ``--gguf-type`` gives most tensors: itself, or a preset's default type."""
    from ..gguf import is_preset
    from ..gguf.presets import DEFAULT

    return DEFAULT.get(gguf_type, gguf_type) if is_preset(gguf_type) else gguf_type


@dataclass(frozen=True)
class QuIPOptions(FinetuneOptions):
    codebook: str = option("e8p", "e8p (E8P lattice, residual stages for 3/4 bits) or scalar (uniform grid ablation)",
                           choices=("e8p", "scalar"))
    rht: bool = option(True, "randomized Hadamard transform on both sides (--no-rht: ablation)")
    rht_seed: int = option(0, "sign vectors seeded by (rht_seed, layer shape, side)")
    scale_search: bool = option(True, "pick the per-matrix scale among 3 by proxy loss (--no-scale-search: fixed)")
    ft_lr: float = option(1e-3, "--finetune: Adam learning rate (signs; scales at lr/10)")

    def __post_init__(self):
        if self.codebook not in ("e8p", "scalar"):
            raise LowbitError(f"--codebook {self.codebook!r}: choose e8p or scalar")
        super().__post_init__()

    def check_grid(self, grid) -> None:
        if grid.gguf_type is not None:
            self._check_gguf(grid.gguf_type)
        elif grid.bits not in (2, 3, 4):
            raise LowbitError(f"--bits {grid.bits} is not supported by --method quip (choose 2, 3 or 4)")

    def rotate_default(self, grid) -> bool:
        """``--rotate`` is on by default on a GGUF type: the incoherence llama.cpp can run (module docstring)."""
        return grid.gguf_type is not None

    def _check_gguf(self, gguf_type: str) -> None:
        t, vector = main_type(gguf_type), vector_types()
        if t not in vector:
            raise LowbitError(f"--method quip --gguf-type {gguf_type}: QuIP#'s BlockLDLQ applies to the I-quant vector "
                              f"grids ({', '.join(vector)}); on {t} use --method gptq --rotate")
        for f in fields(self):
            if f.name in ("codebook", "rht", "rht_seed", "scale_search", "finetune") and \
                    getattr(self, f.name) != default_of(f):
                flag = change_flag(f, getattr(self, f.name))
                raise LowbitError(f"{flag} does not apply with --gguf-type {gguf_type} "
                                  "(the type's grid and block scales replace QuIP#'s codebook, per-layer RHT and "
                                  "fine-tuning; the residual rotation --rotate is its incoherence there)")


register(MethodSpec(
    name="quip", title="QuIP#: RHT incoherence + BlockLDLQ with the E8P lattice codebook (arXiv 2402.04396)",
    order=5, options=QuIPOptions, solve=quip.solve, finetuner=finetuner("quip"),
    produces="quip", gguf=True))
