"""Architecture knowledge as data: where the decoder blocks are and which linears they hold.

An :class:`ArchSpec` names the dotted path of the blocks' ``ModuleList`` and the block's linears in
solve order, grouped by shared input (q/k/v read the same normed hidden state, so they share one
Hessian).  Families without a spec fall back to discovery: the longest ``ModuleList`` of identical
modules that contain linears; the linears are then grouped by the calibration runner, which watches
one forward pass of the first block (linears reading the same tensor form a group, in call order).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LowbitError

Groups = tuple[tuple[str, ...], ...]

LLAMA_LIKE: Groups = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ArchSpec:
    """``blocks``: dotted path to the decoder blocks; ``groups``: linears per block (None = discover)."""

    blocks: str
    groups: Groups | None = None


SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", LLAMA_LIKE),
    "mistral": ArchSpec("model.layers", LLAMA_LIKE),
    "qwen2": ArchSpec("model.layers", LLAMA_LIKE),
    "qwen3": ArchSpec("model.layers", LLAMA_LIKE),
    "gemma3_text": ArchSpec("model.layers", LLAMA_LIKE),
    "gemma3": ArchSpec("model.language_model.layers", LLAMA_LIKE),
    "opt": ArchSpec("model.decoder.layers", (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )),
}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _discover_blocks(model: nn.Module) -> str | None:
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and any(isinstance(x, nn.Linear) for x in mod[0].modules()):
                best, best_len = name, len(mod)
    return best


def resolve_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model``: the family's entry if its paths exist, else a discovered one."""
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    spec = SPECS.get(model_type)
    if spec is not None and isinstance(_get(model, spec.blocks), nn.ModuleList):
        block = _get(model, spec.blocks)[0]
        if all(hasattr(_get(block, n), "in_features") for g in spec.groups for n in g):  # Linear or QuantLinear
            return spec
    path = _discover_blocks(model)
    if path is None:
        raise LowbitError(f"unknown architecture {model_type!r}: no list of decoder blocks with linear layers found")
    return ArchSpec(path, None)


def blocks_of(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return _get(model, spec.blocks)


def linears_of(block: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules of a block, by dotted name, in registration order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
