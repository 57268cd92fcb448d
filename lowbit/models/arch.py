"""Architecture knowledge as data: where the decoder blocks are and which linears they hold.

An :class:`ArchSpec` names the dotted path of the blocks' ``ModuleList`` and the block's linears in
solve order, grouped by shared input (q/k/v read the same normed hidden state, so they share one
Hessian).  Families without a spec fall back to discovery: the longest ``ModuleList`` of identical
modules that contain linears; the linears are then grouped by the calibration runner, which watches
one forward pass of the first block (linears reading the same tensor form a group, in call order).

``scales`` (AWQ's mappings, :mod:`lowbit.methods.awq`): a module whose output channels feed some linears
directly, or through an elementwise op that commutes with positive per-channel scales (attention's
weighted sum of v, ``act(gate)·up``, ReLU), and those linears: a scale ``s`` folds exactly into them,
the module's output channels ÷ ``s``, the linears' input columns × ``s``.  A linear → linear mapping
applies only when the shapes agree (v_proj → o_proj is skipped under grouped-query attention).
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

Scales = tuple[tuple[str, tuple[str, ...]], ...]  # (norm or linear, the linears its output feeds)

LLAMA_SCALES: Scales = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
GEMMA3_SCALES: Scales = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
OPT_SCALES: Scales = (
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    ("fc1", ("fc2",)),  # ReLU(x/s) = ReLU(x)/s for s > 0
)


@dataclass(frozen=True)
class ArchSpec:
    """``blocks``: dotted path to the decoder blocks; ``groups``: linears per block (None = discover);
    ``scales``: AWQ's mappings (None = not known); ``norm_plus_one``: the RMSNorms multiply by ``1 + w`` (Gemma)."""

    blocks: str
    groups: Groups | None = None
    scales: Scales | None = None
    norm_plus_one: bool = False


SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", LLAMA_LIKE, LLAMA_SCALES),
    "mistral": ArchSpec("model.layers", LLAMA_LIKE, LLAMA_SCALES),
    "qwen2": ArchSpec("model.layers", LLAMA_LIKE, LLAMA_SCALES),
    "qwen3": ArchSpec("model.layers", LLAMA_LIKE, LLAMA_SCALES),
    "gemma3_text": ArchSpec("model.layers", LLAMA_LIKE, GEMMA3_SCALES, norm_plus_one=True),
    "gemma3": ArchSpec("model.language_model.layers", LLAMA_LIKE, GEMMA3_SCALES, norm_plus_one=True),
    "opt": ArchSpec("model.decoder.layers", (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ), OPT_SCALES),
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
