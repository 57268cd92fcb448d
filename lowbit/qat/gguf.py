"""DL-QAT on a GGUF type (``--method dlqat --gguf-type TYPE``): the integer grid each layer trains on, and the
layer's GGUF blocks at the end.

Each decoder linear gets the type the GGUF solvers would give it (``--gguf-type``, a preset's per-tensor type,
the row-length fallback: :func:`lowbit.gguf.solve.layer_type`, :func:`lowbit.gguf.types.resolve`; or
``--target-bpw``'s per-tensor plan), then:

* **exact** — the legacy 32-blocks are lowbit group grids with an fp16 scale ``d = s'``:

      Q4_0 = w4 sym g32,  Q5_0 = w5 sym g32,  Q8_0 = w8 sym g32     ŵ = d·(q − 2^(b−1))
      Q4_1 = w4 asym g32, Q5_1 = w5 asym g32                        ŵ = d·q + m,  m = fp16(−d·z)

  DL-QAT trains on exactly that grid (for Q4_1/Q5_1 the fake-quant rounds its offset to fp16 as the block
  stores it: :class:`~.fakequant.FakeQuantLinear` ``fp16_min``), so the blocks hold the trained tensors
  (``d = s'``, codes ``q``, ``m = fp16(−s'·z)``) and decode to the trained ``Ŵ`` bit for bit.
* **projected** — the other types' grids (K-quants' quantized sub-block scales and mins, IQ4_NL's non-uniform
  levels, the I-quants' vector grids) are not a fake-quant's.  DL-QAT trains on the nearest int grid
  (:func:`nearest_grid`: the type's bits, its sub-block as the group, symmetric unless it stores mins) and the
  trained ``Ŵ`` is put onto the type at the end by the type's RTN (:meth:`lowbit.gguf.codec.Codec.quantize`;
  the training loop has no Hessian to run the type's GPTQ with).  The projection costs quality (measured in
  ``tests/test_gguf_methods.py``); the exact types do not.
* **F16** — a row length no block divides (the fallback's end): the layer is not trained, it is stored as F16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gguf.legacy import Legacy
from ..gguf.solve import layer_type
from ..gguf.types import GGUFType, resolve
from ..models.arch import ArchSpec, blocks_of, linears_of
from ..packed.ggufw import GGUFWeight
from .fakequant import Fp16STE, FakeQuantLinear


@dataclass(frozen=True)
class LayerPlan:
    """One linear under ``--gguf-type``: its ``gtype``, why it differs from the type asked (``fallback``), and the
    int grid it trains on (``grid``: a :class:`lowbit.config.QuantConfig`, ``None`` for F16: not trained)."""

    gtype: GGUFType
    fallback: str | None
    grid: object | None

    @property
    def exact(self) -> bool:
        """The type *is* the grid (a legacy type): stored losslessly, no projection."""
        return isinstance(self.gtype.codec, Legacy)

    def info(self) -> dict:
        """What ``lowbit.json`` records for the layer."""
        out = {"gguf_fallback": self.fallback} if self.fallback else {}
        if self.grid is not None:
            g = self.grid
            out["dlqat_grid"] = f"w{g.bits} {'sym' if g.sym else 'asym'} g{g.group_size}"
            out["gguf_projection"] = "exact" if self.exact else "rtn"
        return out


def nearest_grid(gtype: GGUFType) -> tuple[int, int, bool]:
    """``(bits, group size, symmetric)`` of the int grid DL-QAT trains on for ``gtype``: the legacy types' own grid;
    otherwise the type's code width (its integer part of bits per weight where the codec has none: IQ4_NL 4,
    IQ2_* 2, IQ3_* 3), its sub-block (the span of one scale), and symmetric unless it stores mins (Q2_K, Q4_K, Q5_K)."""
    c = gtype.codec
    bits = getattr(c, "bits", None) or int(gtype.bits_per_weight)
    return bits, c.sub, not getattr(c, "has_min", False)


def plan(model: nn.Module, spec: ArchSpec, quant, planned: dict | None = None) -> dict[str, LayerPlan]:
    """``{full layer name: LayerPlan}`` for every decoder linear of ``model``: its type ``planned[name]``
    (``--target-bpw``'s plan) or the one ``quant.gguf_type`` gives it."""
    blocks = blocks_of(model, spec)
    out = {}
    for i, block in enumerate(blocks):
        for name, lin in linears_of(block).items():
            full = f"{spec.blocks}.{i}.{name}"
            shape = tuple(lin.weight.shape)
            wanted = (planned or {}).get(full) or layer_type(quant, shape, full, len(blocks))
            gtype, why = resolve(wanted, shape[1])
            grid = None
            if gtype.name != "F16":
                bits, gs, sym = nearest_grid(gtype)
                grid = quant.replace(bits=bits, group_size=gs, sym=sym)
            out[full] = LayerPlan(gtype, why, grid)
    return out


def float16(W: torch.Tensor) -> GGUFWeight:
    """An untrained layer as GGUF F16."""
    codec = resolve("F16", W.shape[1])[0].codec
    return GGUFWeight.from_fields("F16", codec.quantize(W.detach().float().cpu()))


@torch.no_grad()
def to_gguf(mod: FakeQuantLinear, lp: LayerPlan) -> tuple[GGUFWeight, dict]:
    """The trained layer ``mod`` as ``lp.gtype``'s blocks (module docstring) and its stats."""
    w_hat, q, s_eff = mod.quantized()
    codec = lp.gtype.codec
    if lp.exact:
        codes = q.long()
        fields = {"d": s_eff, "codes": codes}
        if codec.has_min:
            fields["m"] = Fp16STE.apply(-(s_eff * mod.zero))
        elif not bool((mod.zero == codec.offset).all()):
            raise AssertionError(f"internal: a symmetric grid's zero is not {codec.offset}")
        packed = GGUFWeight.from_fields(lp.gtype.name, {k: v.cpu() for k, v in fields.items()})
    else:
        packed = GGUFWeight.from_fields(lp.gtype.name, codec.quantize(w_hat.float().cpu()))
        codes = q.long()
    return packed, {**mod.stats(codes), **lp.info()}
