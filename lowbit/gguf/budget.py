"""Per-tensor GGUF types under a size budget (``--target-bpw B``): choose each linear's type from the measured
error of the candidate types so that the total error is least and the GGUF file holds at most ``B`` bits per weight.

**Size, as the file counts it** (llama.cpp's "BPW": the bytes of every tensor over its number of weights)::

    bits(T, (m, n)) = m · n / block_T · type_size_T · 8          F16: 16 per weight, F32 (norms, biases): 32
    bpw = (Σ_linears bits(T_l, shape_l) + F) / N                 N = every tensor's weights, the others' bits F

The others (token embedding, an untied output head, norms, biases) count at the type they are written with:
:func:`lowbit.gguf.embedding.tensor_type` for the embedding and head (F16 unless ``--embedding-type`` says
otherwise), F32 for 1-D tensors.  A candidate type ``T`` asked for a layer whose rows it cannot hold counts as
its llama.cpp fallback (:func:`lowbit.gguf.types.resolve`: SmolLM2's 576-wide rows take Q4_0 for Q2_K).

**Error of a candidate** for layer ``l`` (weight ``W`` (m, n), Hessian ``H = 2/N·XᵀX`` (n, n) from the *float*
model's calibration stream, one pass over the blocks, :func:`float_hessians`)::

    e_l(T) = ½ tr(ΔW H ΔWᵀ),   ΔW = RTN_T(W; imp = diag H) − W      (the proxy loss the solvers report)

i.e. the type's round-to-nearest, each block's parameters fitted with the Hessian diagonal as importance (as
GPTQ/FOEM's grid fits do), on at most :data:`MAX_ROWS` evenly spaced rows (scaled up: ``e`` sums over rows).
RTN's run is data-free, so its plan is too: ``H = I`` (``½‖ΔW‖²``) and no importance, as llama-quantize without
an imatrix.  GPTQ/FOEM then lower every layer's error by a similar factor, so RTN's
error ranks the types; the chosen types are solved by the method itself (the achieved loss is recorded too).

**Choice: a multiple-choice knapsack**, exactly: ``min Σ_l e_l(T_l)`` s.t. ``Σ_l bits_l(T_l) ≤ C = ⌊B·N⌋ − F``.
Per layer only the Pareto options are kept (more bits must mean less error).  Subtracting each layer's cheapest
option leaves extra sizes ``x_lk ≥ 0`` and the capacity ``c = C − Σ_l min_k bits_lk`` (``c < 0``: B is below the
smallest size the candidates reach, refused naming it).  The sizes are integers with a common divisor ``g``
(their gcd: whole blocks of whole rows), so the dynamic programme over the capacity in units of ``g``::

    D_0(u) = 0,   D_l(u) = min_k { D_{l−1}(u − x_lk/g) + e_lk : x_lk ≤ u·g }          u = 0 … ⌊c/g⌋

is exact, so a larger ``B`` never gives a larger total error.  Its choice table (layers × cells, int8) is small
for real models since sizes are multiples of whole row blocks (Llama-7B at 3.5 bpw: g = 2¹⁶ bits, about 10⁵
cells).  A Lagrangian sweep (``min Σ e + λ·bits`` over λ) reaches only the lower convex hull's breakpoints, a
greedy by ``Δe/Δbits`` can waste the leftover: both can miss the optimum the DP finds.  A table over
:data:`MAX_TABLE` entries is built on a coarser unit instead (from the layers' whole range, not from ``B``; each
size rounded *up*, so the result still fits), then the bits the rounding left are spent greedily: feasible,
near-optimal, no longer exactly monotone in ``B``.

The measured errors do not depend on ``B``: :mod:`lowbit.gguf.measure_cache` keeps them between runs, so a
sweep over sizes measures once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LowbitError
from .types import QUANT_TYPES, TYPES, resolve

DEFAULT_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
MAX_TABLE = 1 << 27  # entries of the DP's choice table (int8): 128 MiB at most
MAX_ROWS = 1024      # rows of a layer the candidates' errors are measured on (:func:`errors`)


def candidates_of(text: str | None) -> tuple[str, ...]:
    """``--bpw-candidates`` (GGUF type names separated by commas or spaces, any case) -> canonical names
    (:data:`DEFAULT_CANDIDATES` for ``None``); anything else is refused in one line."""
    if text is None:
        return DEFAULT_CANDIDATES
    names = [t for t in str(text).replace(",", " ").upper().split() if t]
    bad = [t for t in names if t not in QUANT_TYPES]
    if bad or not names:
        raise LowbitError(f"--bpw-candidates {text!r}: list GGUF types from {', '.join(QUANT_TYPES)}")
    return tuple(dict.fromkeys(names))


def tensor_bits(type_name: str, shape) -> int:
    """Bits a tensor of ``shape`` takes in a GGUF file as ``type_name`` (a type of :data:`TYPES`, or F32)."""
    numel = math.prod(int(s) for s in shape)
    if type_name == "F32":
        return 32 * numel
    t = TYPES[type_name]
    return numel // t.block * t.type_size * 8


def options_of(shape: tuple[int, int], candidates) -> list[str]:
    """The distinct types the ``candidates`` give a layer of weight ``shape`` (m, n), after llama.cpp's row-length
    fallback, by increasing size (F16, the fallback of last resort, is not a candidate)."""
    got = dict.fromkeys(resolve(c, int(shape[1]))[0].name for c in candidates)
    got.pop("F16", None)
    return sorted(got, key=lambda t: tensor_bits(t, shape))


def errors(W: torch.Tensor, H: torch.Tensor | None, types, importance: bool = True,
           max_rows: int = MAX_ROWS) -> list[float]:
    """``e(T) = ½ tr(ΔW H ΔWᵀ)`` of each type's RTN of ``W`` (m, n) (``H`` None: ``½‖ΔW‖²``); with ``importance`` each
    block's parameters are fitted weighting column ``j`` by ``H_jj``.  RTN treats rows alone and ``e`` is a sum over
    rows, so a layer of more than ``max_rows`` rows is measured on ``max_rows`` evenly spaced ones, times
    ``m / max_rows`` (exact below that)."""
    from ..solvers.loss import proxy_loss

    m = W.shape[0]
    scale = 1.0
    if m > max_rows:
        W, scale = W[torch.linspace(0, m - 1, max_rows, device=W.device).long()], m / max_rows
    W = W.float()
    imp = torch.diag(H).float() if H is not None and importance else None
    out = []
    for t in types:
        codec = TYPES[t].codec
        Q = codec.decode(codec.quantize(W, imp))
        e = proxy_loss(W, Q, H) if H is not None else float((Q - W).double().pow(2).sum() / 2)
        out.append(e * scale)
    return out


def choose(bits: list[list[int]], losses: list[list[float]], capacity: int, max_table: int = MAX_TABLE) -> list[int]:
    """The multiple-choice knapsack of the module docstring: per layer ``l`` the index ``k`` of one option
    (``bits[l][k]``, ``losses[l][k]``) with ``Σ bits ≤ capacity`` and ``Σ losses`` least.  Raises ValueError when even
    the cheapest options do not fit."""
    L = len(bits)
    keep = []  # per layer: Pareto options (indices), by increasing bits and strictly decreasing loss
    for b, e in zip(bits, losses):
        ks, best = [], math.inf
        for k in sorted(range(len(b)), key=lambda k: (b[k], e[k])):
            if e[k] < best:
                ks.append(k)
                best = e[k]
        keep.append(ks)
    base = [bits[i][keep[i][0]] for i in range(L)]
    cap = int(capacity) - sum(base)
    if cap < 0:
        raise ValueError("the cheapest options do not fit")
    extra = [[bits[i][k] - base[i] for k in keep[i]] for i in range(L)]
    span = sum(x[-1] for x in extra)
    if cap >= span:  # everything at its largest option fits
        return [ks[-1] for ks in keep]
    g = math.gcd(*[v for x in extra for v in x])
    exact = (cap // g + 1) * L <= max_table
    unit = g if exact else -(-span // max(1, max_table // L - 1))
    cells = cap // unit
    w = [[-(-v // unit) for v in x] for x in extra]  # rounded up: the true sizes fit whenever these do
    best = np.zeros(cells + 1)
    pick = np.zeros((L, cells + 1), dtype=np.int8)
    for i in range(L):
        new = np.full(cells + 1, np.inf)
        for j, (wj, k) in enumerate(zip(w[i], keep[i])):
            if wj > cells:
                break
            cand = best[:cells + 1 - wj] + losses[i][k]
            seg, p = new[wj:], pick[i, wj:]
            better = cand < seg
            seg[better] = cand[better]
            p[better] = j
        best = new
    chosen, u = [0] * L, cells
    for i in reversed(range(L)):
        chosen[i] = int(pick[i, u])
        u -= w[i][chosen[i]]
    if not exact:  # spend what the rounding left: the largest error drop that still fits, until none does
        left = cap - sum(extra[i][chosen[i]] for i in range(L))
        while True:
            drops = [(losses[i][keep[i][chosen[i]]] - losses[i][keep[i][j]], i, j) for i in range(L)
                     for j in range(chosen[i] + 1, len(keep[i])) if extra[i][j] - extra[i][chosen[i]] <= left]
            if not drops:
                break
            _, i, j = max(drops)
            left -= extra[i][j] - extra[i][chosen[i]]
            chosen[i] = j
    return [keep[i][chosen[i]] for i in range(L)]


def other_tensors(model, cfg, n_layers: int, linears: set[str]) -> list[tuple[str, str, tuple]]:
    """``(name, type, shape)`` of every tensor the GGUF file holds besides the planned linears' weights: the token
    embedding and an untied output head at :func:`lowbit.gguf.embedding.tensor_type` (F16 when that module is not
    there), a ``--head-bits`` head of a tied model as its own tensor, 1-D tensors F32, other 2-D ones F16."""
    try:
        from .embedding import tensor_type
    except ImportError:  # pragma: no cover (the embedding types are another module's; F16 as the exporter writes)
        def tensor_type(cfg, role, shape, n_layers, tied=True):
            return "F16"
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    out, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen or name.endswith("rotary_emb.inv_freq") or name.removesuffix(".weight") in linears:
            continue
        seen.add(key)
        shape = tuple(t.shape)
        if t is emb.weight:
            typ = tensor_type(cfg, "token_embd", shape, n_layers, tied=tied and not cfg.head_bits)
            if tied and cfg.head_bits:  # --head-bits unties the head: a tensor of its own
                out.append(("output", tensor_type(cfg, "output", shape, n_layers, tied=False), shape))
        elif head is not None and t is getattr(head, "weight", None):
            typ = tensor_type(cfg, "output", shape, n_layers, tied=False)
        else:
            typ = "F32" if t.dim() <= 1 else "F16"
        out.append((name, typ, shape))
    return out


@torch.no_grad()
def float_hessians(model, spec, windows: torch.Tensor, *, device, dtype, batch_size: int, progress: bool = False):
    """Yield ``(layer name, W (m, n) float32, H (n, n))`` for every linear of every block, ``H = 2/N·XᵀX`` of its
    inputs on the *float* model's stream of ``windows`` (N, T): block by block, one pass per group of linears that
    share an input, cut short there (the runner's statistics, :class:`~lowbit.calib.hessian.InputStats`, in window
    order), then the float block's outputs are the next block's inputs.  The model is not changed."""
    import copy

    from tqdm.auto import tqdm

    from ..calib.distributed import rounds
    from ..calib.runner import capture, discover_groups, group_input_stats, per_window_linears
    from ..models.arch import blocks_of, linears_of
    from ..models.modules import run_block

    blocks = blocks_of(model, spec)
    window, n_rounds = windows.shape[1], rounds(windows.shape[0])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # the embeddings, final norm, head
        if not name.startswith(spec.blocks + "."):
            t.data = t.data.to(device)
    inputs, block_calls = capture(model, blocks, windows, batch_size, device, dtype)
    dev = torch.device(device)
    for i in tqdm(range(len(blocks)), desc="measure", unit="block", disable=not progress):
        work = copy.deepcopy(blocks[i]).to(device=device, dtype=dtype)
        lins = linears_of(work)
        with per_window_linears(work, window):
            for g in spec.groups or discover_groups(work, inputs[0], block_calls[i][0]):
                H = group_input_stats(work, lins[g[0]], inputs, block_calls[i], dev, window,
                                      n_rounds).hessian(free=True)
                for name in g:
                    W = blocks[i].get_submodule(name).weight.detach().to(device=device, dtype=torch.float32)
                    yield f"{spec.blocks}.{i}.{name}", W, H
                del H
            inputs = [run_block(work, h, call) for h, call in zip(inputs, block_calls[i])]
        del work, lins


def plan_run(model, tokenizer, spec, quant, calib, device, n_layers: int, calibrated: bool,
             progress: bool = False) -> "Plan":
    """:func:`plan` for a ``lowbit quantize`` run: a calibrated method measures on the float stream of the same
    calibration windows the runner will use (this process's share under torchrun)."""
    stats = None
    if calibrated:
        from ..calib import distributed
        from ..calib.dtype import calib_dtype
        from ..data import calibration_windows, check_window_count, read_text, tokenize

        ids = tokenize(tokenizer, read_text(calib.source, split="calib"))
        check_window_count(ids, calib.nsamples, calib.seqlen)
        windows = distributed.shard(calibration_windows(ids, calib.nsamples, calib.seqlen, calib.seed))
        dtype, batch = calib_dtype(calib.dtype, device), calib.windows_per_batch()
        stats = float_hessians(model, spec, windows, device=device, dtype=dtype, batch_size=batch, progress=progress)
        return plan(model, spec, quant, n_layers, stats, cache=(windows, (dtype, batch, torch.device(device).type)))
    return plan(model, spec, quant, n_layers, None, cache=(None, ()))


@dataclass
class Plan:
    """The chosen type per linear (``types``) and what ``lowbit.json`` records (``record``, see :func:`plan`)."""

    types: dict[str, str]
    record: dict = field(default_factory=dict)

    def finish(self, results: dict) -> dict:
        """The record with what the run achieved: ``achieved_bpw`` from the stored layers' types, ``loss`` the sum of
        the solvers' proxy losses (``predicted_loss`` is RTN's, on the float stream)."""
        r = self.record
        bits = r["other_bits"] + sum(tensor_bits(p.gguf_type, p.shape) for n, (p, _) in results.items()
                                     if n in self.types)
        losses = [info.get("loss") for n, (_, info) in results.items() if n in self.types]
        done = all(isinstance(x, float) and math.isfinite(x) for x in losses)
        return {**r, "achieved_bpw": bits / r["weights"], "loss": sum(losses) if done else None}


def plan(model, spec, cfg, n_layers: int, stats=None, cache: tuple | None = None) -> Plan:
    """Choose every linear's GGUF type for ``cfg.target_bpw`` (the module docstring).  ``stats``: an iterator of
    ``(name, W, H)`` (:func:`float_hessians`) for a calibrated method, or ``None`` (data-free: ``H = I``).
    ``cache``: ``(windows, settings)`` of the stream ``stats`` comes from (``(None, ())`` data-free) to keep the
    measured errors between runs in a single process (:mod:`lowbit.gguf.measure_cache`; a hit consumes no
    ``stats``); ``None``: always measure.  Refuses a target below what the candidates reach on this model before
    measuring anything."""
    from ..calib.distributed import world
    from ..models.arch import blocks_of, linears_of
    from . import measure_cache
    from .solve import feedback

    target, cands = float(cfg.target_bpw), candidates_of(cfg.bpw_candidates)
    shapes = {f"{spec.blocks}.{i}.{n}": tuple(lin.weight.shape)
              for i, b in enumerate(blocks_of(model, spec)) for n, lin in linears_of(b).items()}
    names = list(shapes)
    opts = {n: options_of(shapes[n], cands) for n in names}
    empty = [n for n in names if not opts[n]]
    if empty:
        raise LowbitError(f"--bpw-candidates {','.join(cands)}: no candidate holds layer '{empty[0]}' "
                          f"(rows of {shapes[empty[0]][1]}); add a 32-block type such as Q8_0")
    others = other_tensors(model, cfg, n_layers, set(names))
    other_bits = sum(tensor_bits(t, s) for _, t, s in others)
    weights = sum(math.prod(s) for s in shapes.values()) + sum(math.prod(s) for _, _, s in others)
    bits = {n: [tensor_bits(t, shapes[n]) for t in opts[n]] for n in names}
    low = (other_bits + sum(b[0] for b in bits.values())) / weights
    high = (other_bits + sum(b[-1] for b in bits.values())) / weights
    if target < low:
        raise LowbitError(f"--target-bpw {cfg.target_bpw}: below the smallest size the candidates reach on this model, "
                          f"{math.ceil(low * 1e4) / 1e4:.4f} bits/weight (candidates {','.join(cands)}; the embedding, "
                          f"head and norms count at {_types_text(others)}; see --embedding-type)")
    importance = stats is not None and feedback(cfg)
    ckey = (measure_cache.key(model, opts, importance, MAX_ROWS, *cache)
            if cache is not None and world()[1] == 1 else None)
    measured = measure_cache.read(ckey, opts) if ckey else None
    cached = measured is not None
    if not cached:
        measured = {}
        if stats is None:
            for i, b in enumerate(blocks_of(model, spec)):
                for n, lin in linears_of(b).items():
                    full = f"{spec.blocks}.{i}.{n}"
                    measured[full] = errors(lin.weight.detach(), None, opts[full])
        else:
            for n, W, H in stats:  # RTN's fits weighted by diag(H) where the method's are (GPTQ, FOEM)
                measured[n] = errors(W, H, opts[n], importance=importance)
        if ckey:
            measure_cache.write(ckey, opts, measured)
    capacity = math.floor(target * weights) - other_bits
    pick = choose([bits[n] for n in names], [measured[n] for n in names], capacity)
    types = {n: opts[n][k] for n, k in zip(names, pick)}
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    predicted = other_bits + sum(bits[n][k] for n, k in zip(names, pick))
    record = {"target_bpw": target, "candidates": list(cands), "predicted_bpw": predicted / weights,
              "reachable_bpw": [low, high], "weights": weights, "other_bits": other_bits,
              "proxy": "rtn, H = I" if stats is None else "rtn, float-stream H", "measured_cached": cached,
              "predicted_loss": sum(measured[n][k] for n, k in zip(names, pick)),
              "types": dict(sorted(counts.items(), key=lambda kv: tensor_bits(kv[0], (1, 256)))),
              "measured": {n: dict(zip(opts[n], measured[n])) for n in names}}
    return Plan(types, record)


def _types_text(others) -> str:
    seen: dict[str, int] = {}
    for _, t, s in others:
        seen[t] = seen.get(t, 0) + math.prod(s)
    return ", ".join(f"{t} ({n} weights)" for t, n in seen.items())


def summary(record: dict) -> str:
    """One line: the target, the predicted and achieved file bpw, the types chosen."""
    types = ", ".join(f"{t} x{c}" for t, c in record["types"].items())
    got = record.get("achieved_bpw")
    return (f"--target-bpw {record['target_bpw']:g}: {record['predicted_bpw']:.4f} bits/weight in the GGUF file"
            + (f" (achieved {got:.4f})" if got is not None else "") + f"; linears {types}")
