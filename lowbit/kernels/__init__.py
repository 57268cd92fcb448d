"""Inference kernels for packed weights, and the dispatcher ``matmul(packed, x)`` that picks one.

``matmul(packed, x)``: ``x`` (…, n) float, ``packed`` any packed weight with ``shape = (m, n)`` ->
``y = x Ŵᵀ`` (…, m) in ``x.dtype`` (no bias).  The dispatcher uses

* :mod:`.group_cpu` — compiled CPU kernel reading the canonical ``GroupQuantWeight`` layout
  (kind ``"int"``, 1–8 bits, any group size, partial last group, sym/asym, ``g_idx``);
* :mod:`.outliers` — GWQ's ``"int+outliers"``: the same kernel for the dense part + a CSR kernel for the outliers;
* :mod:`.quip_cpu` — QuIP#'s E8P/RVQ codes decoded on the fly (``"quip"``, codebook ``e8p``);
* :mod:`.mixed_cpu` — Squeeze10's mixed binary / high-bit cells (``"bin+int"``): bit-plane table lookups and
  the high cells' codes read on the fly, float activations (the same result under ``"auto"`` and ``"exact"``);
* :mod:`.int4_torch` — on CUDA, 4-bit ``"int"`` weights with contiguous groups of 32–256: torch's tinygemm int4
  matmul (``aten._weight_int4pack_mm``, sm80+), repacked once per layer, bf16 math (under ``"exact"`` only for
  bf16 inputs);
* :mod:`.reference` — ``x @ packed.dequantize(x.dtype).T`` for everything else: other formats
  (formats added later), other CUDA weights, buffers not in a kernel's layout (``model.to(torch.bfloat16)`` makes fp16
  scales bf16: every ``supports()`` checks each tensor's dtype, device and shape), inputs that need gradients,
  or when the fast kernel cannot be built (no C++ compiler, build error); that fallback is announced once with
  :func:`warnings.warn`.

The C++ sources are files in ``csrc/`` (package data), built on first use by :mod:`.build`;
:func:`warm_up` builds them all and says which are available and why not (``python -m lowbit.kernels``,
``lowbit kernels``).  The dispatcher lives in :mod:`.dispatch`; this package imports it (and torch) only
when one of its names is first used, so the CLI can register ``lowbit kernels`` without importing torch.

Backends (``LOWBIT_KERNELS=…`` or :func:`use_backend`; tests use it to compare paths on the same model):

* ``"auto"`` (default) — fast kernels; batch-1 decoding of 2/3/4/8-bit ``"int"`` weights rounds the activations to
  int8 blocks of 32 (64 for 2-bit) and uses integer dot products, as llama.cpp's Q8 activations do
  (relative output error ≈ 0.5 %); prefill (many tokens) is exact;
* ``"exact"`` — fast kernels, float activations everywhere (the result of ``"reference"`` up to fp32
  summation order);
* ``"reference"`` — the PyTorch reference for everything.
"""
from ..lazy import lazy

_API = ("matmul", "plan", "plan_key", "kernel_name", "use_backend", "backend", "warm_up", "status_table",
        "KernelStatus", "KERNELS", "SOLVER_KERNELS", "BACKENDS")
__all__ = list(_API)


__getattr__, __dir__ = lazy(__name__, dict.fromkeys(_API, "dispatch"), _API)
