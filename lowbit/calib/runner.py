"""The calibration runner shared by every method: block by block, memory bounded to one block.

1. **Capture.** Every decoder block is replaced by a recorder that stores the positional and keyword
   arguments it is called with (rotary embeddings, masks: whatever the family passes, per block,
   so Gemma's sliding/global layers each get their own) and passes the hidden state through; the
   last recorder stops the pass.  Block 0's hidden states ``(B, T, d)`` per micro-batch are kept.
2. **Per block.** A working copy of the block goes to the compute device in the calibration dtype.
   For each group of linears that share an input (q/k/v; o; gate/up; down), a hook collects
   ``S = ΣXᵀX`` from the group's input and cuts the forward short there; each linear of the group is
   solved from its original float32 weight and ``H = 2/N·S``, and the working copy takes the
   quantized weight, so the next group sees quantized upstream outputs ("true sequential").
   When all windows fit one micro-batch, each group is instead solved inside that pre-hook and the
   pass goes on: one forward per block, whose output is already the quantized block's output.
3. **Propagate.** The quantized block's outputs become the next block's inputs; the model's block
   gets :class:`QuantLinear` modules holding the packed weights.

With ``fp_targets`` (FIAS, Squeeze10) a float copy of every block runs beside the working copy on
the FP stream (the float model's hidden states): each layer is solved for the target of
:mod:`lowbit.calib.fias`, ``W* = (W C + λW)(H + λI)⁻¹`` with ``H`` from its quantized-stream inputs
and ``C`` their cross moments with the FP stream's, so it reproduces the *float* layer's outputs from
the inputs it really gets and compensates the errors of every layer before it.

**Invariance.** Nothing depends on how the windows are grouped into micro-batches (``batch_size``) or spread
over ranks (torchrun): every linear of the working copies multiplies one window (T rows) at a time
(:func:`per_window_linears`), so each window's product has the same shape in any micro-batch, and the
statistics are sums of per-window contributions taken in the global window order in float64
(:mod:`lowbit.calib.hessian`, :mod:`lowbit.calib.distributed`).  The other operations of a block (norms,
attention, activations) compute each window's rows on their own (not enforced: checked by the batch-size
and two-process tests).  The thread count is not covered: it changes
how the BLAS/LAPACK kernels split their sums.

The runner never knows which method it runs: ``solve(W (m, n) float32, H (n, n), name) -> (packed, info)``
with ``name`` the layer's full dotted name.
"""
from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.arch import ArchSpec, blocks_of, linears_of
from ..models.modules import replace_module, run_block
from ..packed.qlinear import QuantLinear
from ..packed.qweight import from_tensors
from .distributed import broadcast_from_owner, rounds
from .fias import CrossStats, fias_targets, input_of
from .hessian import InputStats, StopForward, capture_inputs
from .resume import BlockCheckpoints

Solve = Callable[[torch.Tensor, torch.Tensor, str], tuple[object, dict]]


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: records its call, returns the input unchanged."""

    def __init__(self, block: nn.Module, index: int, calls: list, last: bool):
        super().__init__()
        self.block, self.index, self.calls, self.last = block, index, calls, last

    def __getattr__(self, name):  # model code may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise StopForward
        return hidden_states


def _cast(obj, device, dtype, memo: dict):
    """Move tensors in a nested structure to ``device``; floating ones to ``dtype`` (shared via memo)."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(_cast(o, device, dtype, memo) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, device, dtype, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, device, dtype, memo) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, prefix: str, device) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix + ".") and t.device != torch.device(device):
            t.data = t.data.to(device)


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int, device,
            dtype) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Run the embeddings on ``windows`` (N, T) in micro-batches; returns block 0's inputs (one
    ``(B, T, d)`` tensor per micro-batch) and, per block, per micro-batch, its ``(args, kwargs)``."""
    inputs, block_calls = [], [[] for _ in blocks]
    originals = list(blocks)
    for b0 in range(0, windows.shape[0], batch_size):
        calls: list = []
        for i, blk in enumerate(originals):
            blocks[i] = _Recorder(blk, i, calls, last=i == len(originals) - 1)
        try:
            model(input_ids=windows[b0:b0 + batch_size].to(device), use_cache=False)
        except StopForward:
            pass
        finally:
            for i, blk in enumerate(originals):
                blocks[i] = blk
        memo: dict = {}
        for index, h, args, kwargs in calls:
            if index == 0:
                inputs.append(h.to(device=device, dtype=dtype))
            block_calls[index].append((_cast(args, device, dtype, memo), _cast(kwargs, device, dtype, memo)))
    return inputs, block_calls


def _window_linear(lin: nn.Linear, rows: int, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` for ``x`` (…, n) computed one window at a time: the rows of ``x`` (B·T of them, in window
    order, whether the block passes ``(B, T, n)`` or flattened ``(B·T, n)``) in blocks of ``rows`` = T."""
    X = x.reshape(-1, x.shape[-1]).contiguous()  # the same row layout in every micro-batch
    if X.shape[0] <= rows:
        out = F.linear(X, lin.weight, lin.bias)
    else:  # written in place: no second copy of the output
        out = X.new_empty(X.shape[0], lin.out_features)
        for r0 in range(0, X.shape[0], rows):
            out[r0:r0 + rows] = F.linear(X[r0:r0 + rows], lin.weight, lin.bias)
    return out.reshape(*x.shape[:-1], lin.out_features)


@contextmanager
def per_window_linears(module: nn.Module, rows: int):
    """While active, every ``nn.Linear`` in ``module`` multiplies ``rows`` rows (one window) at a time, so a
    window's outputs are the same bits in a micro-batch of any size (BLAS kernels block and sum differently
    for different shapes)."""
    lins = linears_of(module).values()
    for lin in lins:
        lin.forward = lambda x, lin=lin: _window_linear(lin, rows, x)
    try:
        yield module
    finally:
        for lin in lins:
            lin.__dict__.pop("forward", None)


@torch.no_grad()
def group_input_stats(block: nn.Module, first: nn.Linear, inputs: list, calls: list, device, window: int,
                      n_rounds: int) -> InputStats:
    """``S = ΣXᵀX`` of ``first``'s input over every micro-batch of ``inputs`` (with their ``calls``), each pass
    through ``block`` cut short at ``first`` (the statistics of one group of linears sharing that input)."""
    st = InputStats(first.in_features, torch.device(device), window, n_rounds)
    with capture_inputs(first, st, stop=True):
        for h, call in zip(inputs, calls):
            try:
                run_block(block, h, call)
            except StopForward:
                pass
    return st


@torch.no_grad()
def discover_groups(block: nn.Module, h: torch.Tensor, call: tuple) -> tuple[tuple[str, ...], ...]:
    """Group a block's linears by shared input, in call order, from one forward pass."""
    order: dict = {}
    alive: list = []  # holds every seen input, so a freed one's address cannot be reused by a later input
    handles = []
    for name, lin in linears_of(block).items():
        def hook(_m, args, name=name):
            x = args[0]
            alive.append(x)
            order.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        run_block(block, h[:1], (call[0], call[1]))
    finally:
        for hd in handles:
            hd.remove()
    return tuple(tuple(names) for names in order.values())


@torch.no_grad()
def quantize_data_free(model: nn.Module, spec: ArchSpec, solve: Solve, offload=None) -> dict[str, tuple[object, dict]]:
    """The block walk without data (RTN): every linear of every block is solved from its float32 weight with
    ``H = None`` and becomes a :class:`QuantLinear`, in place.  Returns ``{layer name: (packed, info)}``.
    With ``offload`` each block is read from disk just before and released just after."""
    results: dict[str, tuple[object, dict]] = {}
    for i, block in enumerate(blocks_of(model, spec)):
        if offload is not None:
            offload.materialize(i)
        for name, lin in linears_of(block).items():
            full = f"{spec.blocks}.{i}.{name}"
            results[full] = solve(lin.weight.detach().float(), None, full)
            replace_module(block, name, QuantLinear(results[full][0], lin.bias))
        if offload is not None:
            lin = None  # the float linear may go
            offload.release(i)
    return results


def _solve_in_one_pass(work: nn.Module, lin: dict, groups, h: torch.Tensor, call: tuple, solve_group,
                       window: int, n_rounds: int) -> torch.Tensor:
    """All calibration windows in one micro-batch: each group is solved inside the pre-hook of its
    first linear, before any of its members is applied, so one forward pass is fully true-sequential
    and its output is already the quantized block's output."""
    handles = []
    for g in groups:
        def hook(_m, args, g=g):
            if f"{g[0]}" not in solved:
                stats = InputStats(args[0].shape[-1], args[0].device, window, n_rounds)
                stats.add(args[0])
                solve_group(g, stats.hessian(free=True))
                solved.add(g[0])
        handles.append(lin[g[0]].register_forward_pre_hook(hook))
    solved: set = set()
    try:
        return run_block(work, h, call)
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def quantize_blocks(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, solve: Solve, *, device="cpu",
                    dtype=torch.float32, batch_size: int = 8, true_sequential: bool = True,
                    fp_targets: bool = False, progress: bool = True,
                    finetune_block: Callable | None = None,
                    checkpoints: BlockCheckpoints | None = None,
                    offload=None, prepare_block: Callable | None = None) -> dict[str, tuple[object, dict]]:
    """Quantize every linear of every block of ``model`` in place (they become :class:`QuantLinear`);
    ``windows`` (N, T) are the calibration token ids.  Returns ``{layer name: (packed, info)}``.

    ``finetune_block(work, fp_block, inputs, calls, index, fp_inputs) -> None`` (optional, :mod:`lowbit.calib.finetune`)
    runs after a block's linears are solved: ``work`` holds them as :class:`QuantLinear` modules (on the device,
    calibration dtype), ``fp_block`` is a float copy of the original block, ``inputs``/``calls`` the block's
    micro-batches and their ``(args, kwargs)``, ``index`` the block's index (so its randomness does not depend
    on how many blocks this process ran), ``fp_inputs`` the FP stream's micro-batches (FIAS) or ``None``.  It may
    replace ``work``'s QuantLinear modules; their packed weights are the result, and the next block's inputs are
    recomputed through ``work``.

    ``prepare_block(block, inputs, calls, index) -> None`` (optional, e.g. AWQ's scales): runs on the model's
    float ``block`` in place before anything is read from it (the working copy, the original weights the
    solver gets, the FP reference of FIAS and fine-tuning), with the block's calibration ``inputs``
    (micro-batches ``(B, T, d)`` on the device) and ``calls`` (their ``(args, kwargs)``).

    ``checkpoints`` (optional, :mod:`lowbit.calib.resume`): every finished block is committed there with the next
    block's inputs; blocks it restores get their QuantLinear modules and results back and are skipped.

    ``offload`` (optional, :class:`lowbit.models.offload.DiskOffload`): the blocks' parameters start on the ``meta``
    device; ``offload.materialize(i)`` loads block ``i`` just before it is processed (or restored) and
    ``offload.release(i)`` runs once its linears are :class:`QuantLinear`, so at most one block is ever in float;
    the embedding and head are released after the inputs are captured and read back at the end."""
    blocks = blocks_of(model, spec)
    window, n_rounds = windows.shape[1], rounds(windows.shape[0])  # tokens per window; rounds of window sums
    _move_outside_blocks(model, spec.blocks, device)
    inputs, block_calls = capture(model, blocks, windows, batch_size, device, dtype)
    if offload is not None:
        offload.release_embeddings()  # not needed again until the model is saved
    fp_inputs = list(inputs) if fp_targets else []  # FIAS: the float model's stream
    results: dict[str, tuple[object, dict]] = {}
    start = 0
    if checkpoints is not None:
        start, results, saved = checkpoints.restore(len(blocks))
        if saved is not None:
            saved = [h.to(device) for h in saved]
            inputs, fp_inputs = (saved[:len(saved) // 2], saved[len(saved) // 2:]) if fp_targets else (saved, [])
        for name, (packed, _) in results.items():
            if offload is not None and name.startswith(f"{spec.blocks}."):
                j = int(name[len(spec.blocks) + 1:].split(".", 1)[0])
                if j not in offload.loaded:
                    offload.materialize(j)
            lin = model.get_submodule(name)
            replace_module(model, name, QuantLinear(packed, lin.bias))
    bar = tqdm(range(start, len(blocks)), desc="quantize", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    for i in bar:
        if offload is not None:
            offload.materialize(i)
        block = blocks[i]
        if prepare_block is not None:
            prepare_block(block, inputs, block_calls[i], i)
        work = copy.deepcopy(block).to(device=device, dtype=dtype)
        work_lin, orig_lin = linears_of(work), linears_of(block)
        groups = spec.groups or discover_groups(work, inputs[0], block_calls[i][0])
        losses: dict[str, float] = {}
        block_inputs, block_fp_inputs = inputs, fp_inputs

        def solve_group(g: tuple[str, ...], H: torch.Tensor, C: torch.Tensor | None = None) -> None:
            Ws = [orig_lin[name].weight.detach().to(device=device, dtype=torch.float32) for name in g]
            if C is not None:
                Ws = fias_targets(Ws, H, C)  # one factorization for the group
            for name, W in zip(g, Ws):
                full = f"{spec.blocks}.{i}.{name}"
                packed, info = solve(W, H.float() if C is not None else H, full)
                w = broadcast_from_owner(packed.dequantize(torch.float32).to(device))  # same block on all ranks
                work_lin[name].weight.data = w.to(dtype)
                results[full] = (packed, info)
                losses[name.rsplit(".", 1)[-1]] = info.get("loss", float("nan"))

        dev = torch.device(device)
        one_pass = not fp_targets and true_sequential and len(inputs) == 1
        with ExitStack() as per_window:
            per_window.enter_context(per_window_linears(work, window))
            if fp_targets:
                ref = copy.deepcopy(block).to(device=device, dtype=dtype)
                per_window.enter_context(per_window_linears(ref, window))
                ref_lin = linears_of(ref)
                for g in groups:  # always true-sequential: each group sees its quantized predecessors
                    st = CrossStats(work_lin[g[0]].in_features, dev, window, n_rounds)
                    for h, hf, call in zip(inputs, fp_inputs, block_calls[i]):
                        st.add(input_of(work, work_lin[g[0]], h, call), input_of(ref, ref_lin[g[0]], hf, call))
                    solve_group(g, *st.finish())
                fp_inputs = [run_block(ref, hf, call) for hf, call in zip(fp_inputs, block_calls[i])]
                del ref, ref_lin
            elif one_pass:
                inputs = [_solve_in_one_pass(work, work_lin, groups, inputs[0], block_calls[i][0], solve_group,
                                             window, n_rounds)]
            else:  # one pass per group, cut short at its input; without true_sequential all are solved at the end
                pending = []
                for g in groups:
                    st = group_input_stats(work, work_lin[g[0]], inputs, block_calls[i], dev, window, n_rounds)
                    st.pad()  # before any other collective, so every rank's sequence of collectives is the same
                    if true_sequential:
                        solve_group(g, st.hessian(free=True))
                    else:
                        pending.append((g, st))
                for g, st in pending:
                    solve_group(g, st.hessian(free=True))
            if not one_pass:
                inputs = [run_block(work, h, call) for h, call in zip(inputs, block_calls[i])]
        if finetune_block is not None:
            names = [n for n in work_lin if f"{spec.blocks}.{i}.{n}" in results]
            for name in names:
                replace_module(work, name, QuantLinear(results[f"{spec.blocks}.{i}.{name}"][0], orig_lin[name].bias).to(device))
            fp_block = copy.deepcopy(block).to(device=device, dtype=dtype)
            finetune_block(work, fp_block, block_inputs, block_calls[i], i, block_fp_inputs if fp_targets else None)
            del fp_block
            for name in names:
                p = work.get_submodule(name).packed
                full = f"{spec.blocks}.{i}.{name}"
                results[full] = (from_tensors({k: t.cpu() for k, t in p.tensors().items()}, p.meta()), results[full][1])
            inputs = [run_block(work, h, call) for h, call in zip(block_inputs, block_calls[i])]
        for name in work_lin:
            if f"{spec.blocks}.{i}.{name}" in results:
                lin = orig_lin[name]
                replace_module(block, name, QuantLinear(results[f"{spec.blocks}.{i}.{name}"][0], lin.bias))
        del work, work_lin, orig_lin, block
        if offload is not None:
            offload.release(i)
        if checkpoints is not None:
            prefix = f"{spec.blocks}.{i}."
            checkpoints.save(i, {n: r for n, r in results.items() if n.startswith(prefix)}, inputs + fp_inputs)
        if progress:
            bar.write(f"block {i:3d}  " + "  ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    if offload is not None:
        offload.materialize_embeddings()
        _move_outside_blocks(model, spec.blocks, device)
    return results

