"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): per-channel scales searched on the
calibration activations, folded into the float block, then RTN or GPTQ on the scaled weights.

For a mapping ``prev → (W_1, …, W_k)`` of the architecture's data (:data:`lowbit.models.arch.ArchSpec.scales`:
a norm or linear whose output ``x`` (n channels) is the common input of the linears ``W_i`` (m_i, n)),
``W_i x = (W_i diag(s)) (diag(s)⁻¹ x)`` for any ``s > 0``: dividing ``prev``'s output channels by ``s`` and
multiplying the linears' input columns by ``s`` leaves the float block unchanged, but moves the rounding
error: the quantized layer is ``W'_i = Q(W_i diag(s)) diag(s)⁻¹``, so channels with large activations
(large ``s``) get a relatively finer grid.  Per mapping, from the float block's inputs ``X`` (N, n):

    a_j = mean_t |x_tj|,   H = 2/N · XᵀX                       (float64 sums, window order)
    s(α) = a^α / sqrt(max a^α · min a^α),  α ∈ {0, 1/G, …, (G − 1)/G}   (a clamped at 1e-4·max a)
    err(α) = Σ_i ½ tr((W_i − W'_i) H (W_i − W'_i)ᵀ) = Σ_i mean_t ‖(W_i − W'_i) x_t‖²

with ``Q`` the round-to-nearest group grid (the values :func:`lowbit.solvers.rtn.solve` stores), or with ``--gguf-type``
the layer's GGUF type's own round-to-nearest (its codec's, the values :func:`lowbit.gguf.solve.solve` stores for RTN;
a preset's per-tensor type, rows it cannot hold falling back as there); the α of least error is kept (α = 0 is
s = 1, plain RTN, so the proxy error is never above RTN's) and folded in float32:

    norm:       w ← w / s   (LayerNorm: its bias too; Gemma's RMSNorm ``(1 + w)``: w ← (1 + w)/s − 1)
    linear:     rows of W_prev and its bias ← ÷ s      (v_proj → o_proj, up_proj → down_proj, fc1 → fc2)
    mapped:     columns of W_i ← × s

The mappings are taken in the data's order, each searched on the weights as the earlier ones left them;
the statistics are read from the float block before any fold (one pass per mapping, cut short at its
first linear; folding leaves every mapped input unchanged in exact arithmetic).
The runner then solves the transformed block as usual (``--awq-solver rtn`` or ``gptq``, ``H`` from the
scaled inputs); the packed format is the ordinary int group format, or with ``--gguf-type`` the type's blocks
(``rtn``: the type's RTN; ``gptq``: the type's column-feedback solver, :mod:`lowbit.gguf.solve`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.distributed import add_in_window_order, rounds, total_count, world
from ..calib.hessian import StopForward, float_rows, window_gram, windows_of
from ..calib.runner import per_window_linears
from ..errors import LowbitError
from ..gguf.types import resolve
from ..models.arch import SPECS
from ..models.modules import run_block
from ..options import int_range
from ..solvers import gptq, rtn
from ..solvers.grid import UniformGrid
from ..solvers.loss import proxy_loss
from .base import MethodSpec, option, register

SOLVERS = {"rtn": rtn.solve, "gptq": gptq.solve}
CLAMP = 1e-4  # activation magnitudes below CLAMP·max(a) count as CLAMP·max(a) (dead channels)


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's own settings."""

    awq_solver: str = option("rtn", "solver of the scaled weights: rtn (the paper) or gptq (error feedback)",
                             choices=tuple(SOLVERS))
    awq_grid: int = option(20, "number of exponents α ∈ [0, 1) searched per mapping (α = 0 is plain RTN)",
                           metavar="G", type=int_range(1, 1001))

    def __post_init__(self):
        if self.awq_solver not in SOLVERS:
            raise LowbitError(f"--awq-solver {self.awq_solver!r}: choose {', '.join(SOLVERS)}")
        if not 1 <= self.awq_grid <= 1000:
            raise LowbitError(f"--awq-grid {self.awq_grid} must be in 1..1000")


class ChannelStats:
    """Running ``A = Σ_t |x_t|`` (n,) and ``S = Σ_w X_wᵀX_w`` (n, n) of one input, float64, in the global window
    order (every window's contribution is added on its own: :func:`add_in_window_order`, so the sums do not depend
    on micro-batches or ranks).  ``window``: tokens per window; ``n_rounds``: rounds every rank takes part in."""

    def __init__(self, n: int, device, window: int, n_rounds: int):
        self.A = torch.zeros(n, dtype=torch.float64, device=device)
        self.S = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.window, self.n_rounds, self.count, self.seen = window, n_rounds, 0, 0

    def add(self, x: torch.Tensor) -> None:
        X = float_rows(x.detach())
        for Xw in windows_of(X, self.window):
            add_in_window_order(self.S, window_gram(Xw))
            add_in_window_order(self.A, Xw.abs().sum(0, dtype=torch.float64))
            self.seen += 1
        self.count += X.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a = A/N (n,) float64, H = 2/N·S (n, n) float32)`` over every rank's ``N`` tokens."""
        while world()[1] > 1 and self.seen < self.n_rounds:  # zeros for the rounds this rank has no window in,
            add_in_window_order(self.S, torch.zeros_like(self.S, dtype=torch.float32))  # in add()'s dtypes
            add_in_window_order(self.A, torch.zeros_like(self.A))
            self.seen += 1
        N = max(total_count(self.count), 1)
        return self.A / N, (self.S * (2.0 / N)).float()


def channel_scales(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = a^α / sqrt(max a^α · min a^α)`` (n,) float32 from the magnitudes ``a`` (n,), clamped at ``CLAMP·max a``."""
    a = a.double().clamp(min=CLAMP * float(a.max()) if float(a.max()) > 0 else 1.0)
    s = a.pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).float()


def rtn_values(W: torch.Tensor, cfg, gguf_type: str | None = None) -> torch.Tensor:
    """``Q(W)`` (m, n): ``W`` rounded to nearest on ``cfg``'s group grid, the values :func:`lowbit.solvers.rtn.solve`
    stores; every (row, group) cell is one row of a ``(m·n/g, g)`` view, fitted at once (a partial last group apart).
    With ``gguf_type`` (a GGUF type's name): that type's round-to-nearest (after the row-length fallback), the
    values :func:`lowbit.gguf.solve.solve` stores for RTN."""
    m, n = W.shape
    if gguf_type is not None:
        codec = resolve(gguf_type, n)[0].codec
        return codec.decode(codec.quantize(W.float()))
    gs = cfg.group_size_for(n)
    grid = UniformGrid(cfg.bits, cfg.sym, cfg.mse)
    full = n // gs * gs
    parts = []
    for cells, shape in ((W[:, :full].reshape(-1, gs), (m, full)), (W[:, full:], (m, n - full))):
        if cells.numel():
            scale, zero = grid.fit(cells)
            parts.append(grid.dequantize(grid.quantize(cells, scale, zero), scale, zero).reshape(shape))
    return torch.cat(parts, 1)


def scaled_error(Ws: list[torch.Tensor], s: torch.Tensor, H: torch.Tensor, cfg, types: list | None = None) -> float:
    """``Σ_i ½ tr(ΔW_i H ΔW_iᵀ)`` with ``ΔW_i = W_i − Q(W_i diag s) diag(s)⁻¹``, ``Q`` the RTN group grid of ``cfg``,
    or the GGUF type ``types[i]`` of each linear (:func:`rtn_values`)."""
    types = types or [None] * len(Ws)
    return sum(proxy_loss(W, rtn_values(W * s, cfg, t) / s, H) for W, t in zip(Ws, types))


def search(Ws: list[torch.Tensor], a: torch.Tensor, H: torch.Tensor, cfg, n_grid: int,
           types: list | None = None) -> tuple[float, torch.Tensor, list]:
    """The grid search over α: ``Ws`` the mapped linears' weights (m_i, n) float32, ``a`` (n,) and ``H`` (n, n) their
    input statistics, ``types`` their GGUF types (``None``: the group grid).  Returns ``(α, s (n,), [err(α) for every
    α])``; the first α of least error wins (ties: smaller α)."""
    alphas = [i / n_grid for i in range(n_grid)]
    errs = [scaled_error(Ws, channel_scales(a, al).to(Ws[0].device), H, cfg, types) for al in alphas]
    best = min(range(n_grid), key=lambda i: (errs[i], i))
    return alphas[best], channel_scales(a, alphas[best]), errs


@torch.no_grad()
def fold(block: nn.Module, prev: str, names: tuple[str, ...], s: torch.Tensor, plus_one: bool = False) -> None:
    """Fold ``s`` (n,) into ``block`` in place: ``prev``'s output channels ÷ ``s``, the linears' columns × ``s``
    (float32 arithmetic, cast back to each tensor's dtype)."""
    def scale(t: torch.Tensor, f: torch.Tensor, offset: float = 0.0) -> None:
        t.data = ((t.data.float() + offset) * f.to(t.device) - offset).to(t.dtype)

    p = block.get_submodule(prev)
    if isinstance(p, nn.Linear):
        scale(p.weight, 1 / s[:, None])
    else:  # a norm: weight (and LayerNorm's bias) per channel
        scale(p.weight, 1 / s, 1.0 if plus_one else 0.0)
    if getattr(p, "bias", None) is not None:
        scale(p.bias, 1 / s)
    for name in names:
        scale(block.get_submodule(name).weight, s[None, :])


def mappings(block: nn.Module, spec) -> list[tuple[str, tuple[str, ...]]]:
    """The spec's mappings that apply to ``block``: linear → linear only when the shapes agree (not under GQA)."""
    if spec.scales is None:
        known = ", ".join(sorted(k for k, v in SPECS.items() if v.scales))
        raise LowbitError(f"--method awq: no norm → linear scale mappings for this architecture "
                          f"({type(block).__name__}); supported families: {known}")
    out = []
    for prev, names in spec.scales:
        p = block.get_submodule(prev)
        if isinstance(p, nn.Linear) and any(block.get_submodule(n).in_features != p.out_features for n in names):
            continue
        out.append((prev, tuple(names)))
    return out


@torch.no_grad()
def collect(block: nn.Module, maps, inputs: list, calls: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(a (n,), H (n, n))]`` per mapping: the statistics of its linears' common input over the calibration
    micro-batches ``inputs`` (B, T, d) with their ``(args, kwargs)`` ``calls``, one pass per mapping cut short at its
    first linear (so every rank's collectives come in the same order).  A norm's mapping must read the norm's output
    as it is, else the scales could not be folded (e.g. OPT with ``do_layer_norm_before=False``): refused."""
    window = inputs[0].shape[1]
    n_rounds = rounds(sum(h.shape[0] for h in inputs))
    out = []
    with per_window_linears(block, window):
        for prev, names in maps:
            first, p = block.get_submodule(names[0]), block.get_submodule(prev)
            st = ChannelStats(first.in_features, inputs[0].device, window, n_rounds)
            seen: dict = {}

            def keep(_m, _args, output):
                seen["prev"] = output

            def hook(_m, args):
                x = args[0]
                y = seen.get("prev")
                if not isinstance(p, nn.Linear) and x is not y and not (y is not None and torch.equal(x, y)):
                    raise LowbitError(f"--method awq: {names[0]} does not read the output of {prev} in "
                                      f"{type(block).__name__}, so AWQ's scales cannot be folded into it")
                st.add(x)
                raise StopForward

            handles = [p.register_forward_hook(keep), first.register_forward_pre_hook(hook)]
            try:
                for h, call in zip(inputs, calls):
                    try:
                        run_block(block, h, call)
                    except StopForward:
                        pass
            finally:
                for hd in handles:
                    hd.remove()
            out.append(st.finish())
    return out


def layer_types(cfg, block: nn.Module, names, prefix: str | None, n_layers: int | None,
               planned: dict | None = None) -> list | None:
    """The GGUF type of each linear ``names`` of ``block``: ``planned[full name]`` (``--target-bpw``'s plan), else
    ``cfg.gguf_type``'s (a preset's per-tensor type needs the block's full name ``prefix`` ``model.layers.3`` and the
    model's ``n_layers``); ``None`` when neither applies (the int group grid)."""
    full = [None if prefix is None else f"{prefix}.{n}" for n in names]
    if planned and all(f in planned for f in full):
        return [planned[f] for f in full]
    if cfg.gguf_type is None:
        return None
    from ..gguf.solve import feedback, layer_type

    return [layer_type(cfg, tuple(block.get_submodule(n).weight.shape), f, n_layers, imatrix=feedback(cfg))
            for n, f in zip(names, full)]  # as the runner's solve will ask


@torch.no_grad()
def prepare_block(block: nn.Module, inputs: list, calls: list, spec, cfg, prefix: str | None = None,
                  n_layers: int | None = None, gguf_types: dict | None = None) -> dict:
    """Search and fold AWQ's scales into the float ``block`` (in place).  Statistics from a copy of the block in the
    inputs' device and dtype; the search on the block's weights in float32 on that device.  Returns, per linear of
    an applied mapping, ``{name: {"awq_alpha": α}}`` (the α its input columns were scaled with).  ``prefix`` (the
    block's full name) and ``n_layers`` are needed only for a ``--gguf-type`` preset, ``gguf_types`` ``{full name:
    type}`` is ``--target-bpw``'s plan (:func:`layer_types`)."""
    maps = mappings(block, spec)
    dev = inputs[0].device
    ref = copy.deepcopy(block).to(device=dev, dtype=inputs[0].dtype)
    stats = collect(ref, maps, inputs, calls)
    del ref
    chosen = {}
    for (prev, names), (a, H) in zip(maps, stats):
        Ws = [block.get_submodule(n).weight.detach().to(device=dev, dtype=torch.float32) for n in names]
        types = layer_types(cfg, block, names, prefix, n_layers, gguf_types)
        alpha, s, _ = search(Ws, a, H, cfg, cfg.awq_grid, types)
        if alpha > 0:  # α = 0 is s = 1: nothing to fold
            fold(block, prev, names, s, spec.norm_plus_one)
        chosen.update({n: {"awq_alpha": alpha} for n in names})
    return chosen


def solve(W: torch.Tensor, H: torch.Tensor, cfg, **extra) -> tuple[object, dict]:
    """The scaled weight ``W`` (m, n) by ``--awq-solver`` (:mod:`lowbit.solvers.rtn` or :mod:`lowbit.solvers.gptq`;
    with ``--gguf-type`` the runner calls :func:`lowbit.gguf.solve.solve` instead, which reads ``--awq-solver``)."""
    return SOLVERS[cfg.awq_solver](W, H, cfg)


register(MethodSpec(
    name="awq", title="AWQ: activation-aware per-channel scales folded into the block, then RTN or GPTQ (Lin et al. 2023)",
    order=7, options=AWQOptions, solve=solve, prepare_block=prepare_block,
    offload=True,    # a block's folded norms stay in memory once it is materialized (a test compares the files)
    resume=False,    # a restored block's folded norms are not in the per-block checkpoints
    processes=True,  # statistics summed in window order over ranks (lowbit.calib.distributed)
    gguf=True,       # the search measures the type's own rounding; the runner solves on the type
    produces="int"))
