"""Validated configuration: one frozen dataclass per concern, built by the CLI or the Python API.

Nothing below the CLI sees command-line arguments: solvers read :class:`QuantConfig`, the runner
reads :class:`CalibConfig`.  ``asdict`` of both is saved in ``lowbit.json`` next to every artifact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from .errors import LowbitError


class Method(str, Enum):
    """Quantization methods."""

    RTN = "rtn"    # round-to-nearest on the group grid; data-free
    GPTQ = "gptq"  # column-feedback with the calibration Hessian (Frantar et al. 2022)
    FOEM = "foem"  # GPTQ + first-order error compensation (arXiv 2507.11017)
    GWQ = "gwq"    # gradient-selected fp16 outliers + GPTQ/RTN for the rest (arXiv 2411.00850)
    SQUEEZE = "squeeze"  # staged 1-bit/4-bit mixed precision with PBAR and FIAS (arXiv 2507.18073)
    DLQAT = "dlqat"  # LoRA + group-magnitude quantization-aware training, see lowbit.qat (arXiv 2504.09223)
    QUIP = "quip"  # RHT incoherence + BlockLDLQ with the E8P lattice codebook, RVQ for 3/4 bits (arXiv 2402.04396)


SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class QuantConfig:
    """How each linear weight is quantized."""

    method: Method = Method.GPTQ
    bits: int = 4                 # code width; 2…8
    group_size: int = 128         # columns sharing a scale; -1 = one group per row; need not divide n
    sym: bool = False             # symmetric grid (zero = 2^(bits-1)) instead of asymmetric
    act_order: bool = True        # GPTQ: quantize columns by decreasing diag(H) (free with static groups)
    static_groups: bool = True    # with act_order: fit group grids before permuting (contiguous groups)
    damp: float = 0.01            # GPTQ: λ in H + λ·mean(diag H)·I, raised ×10 on failure
    block_size: int = 128         # GPTQ: lazy-update block width
    mse: bool = True              # shrink each group's range by MSE search (1.0 … 0.8)
    beta: float = 0.1             # FOEM: first-order coefficient β (0 = GPTQ); > 0.5 degrades
    pullback: str = "next"        # FOEM: pull back the next column only ("next") or all remaining ("all")
    outlier_frac: float = 0.01    # GWQ: fraction of weights kept exactly in fp16
    saliency: str = "grad"        # GWQ: outlier score: grad (Σ|∂L/∂W|), hessian (w²/[H⁻¹]_jj²) or magnitude (|w|)
    outlier_select: str = "matrix"  # GWQ: top fraction per "matrix", per "row" or per "group"
    gwq_solver: str = "gptq"      # GWQ: dense part by "gptq" (error feedback) or "rtn"
    binary_frac: float = 0.8      # Squeeze10: fraction of (row, group) cells binarized
    high_bits: int = 4            # Squeeze10: width of the cells that are not binarized
    squeeze_score: str = "pbar"   # Squeeze10: which cells to binarize: "pbar" (output error) or "magnitude"
    squeeze_staged: bool = True   # Squeeze10: score against the 4-bit stage-1 solution (False: one-shot, vs FP)
    binary_residual: bool = False  # Squeeze10: binary cells μ + α₁·b₁ + α₂·b₂ (BiLLM residual; +1 bit/weight, +fp16/cell)
    codebook: str = "e8p"         # QuIP#: "e8p" (E8P lattice, RVQ for 3/4 bits) or "scalar" (uniform grid ablation)
    rht: bool = True              # QuIP#: randomized Hadamard transform on both sides (False: ablation)
    rht_seed: int = 0             # QuIP#: sign vectors seeded by (rht_seed, layer shape, side)
    scale_search: bool = True     # QuIP#: pick the per-matrix scale among a few ρ by proxy loss (False: fixed ρ)
    finetune: bool = False        # QuIP#/Squeeze10: per-block Adam on signs/scales against the FP block outputs
    ft_steps: int = 50            # QuIP#/Squeeze10: fine-tuning steps per block
    ft_lr: float | None = None    # Adam lr; None = 1e-3 (QuIP#: signs, scales at lr/10), 5e-3 (Squeeze10: cell factors)
    head_bits: int = 0            # output head (lm_head) too: 0 = keep it float; 2…8 = RTN, sym, groups of 32
    gguf_type: str | None = None  # rtn/gptq/foem on this GGUF type's own grid (lowbit.gguf; bits/group_size unused)

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise LowbitError(f"--method: unknown method {self.method!r} (choose from "
                              f"{', '.join(m.value for m in Method)})") from None
        if self.ft_lr is None:  # the learning rates the benchmarks ran with, per method (BENCHMARKS.md)
            object.__setattr__(self, "ft_lr", 5e-3 if self.method == Method.SQUEEZE else 1e-3)
        if self.bits not in SUPPORTED_BITS:
            raise LowbitError(f"--bits {self.bits} is not supported (choose from {', '.join(map(str, SUPPORTED_BITS))})")
        if self.head_bits and self.head_bits not in SUPPORTED_BITS:
            raise LowbitError(f"--head-bits {self.head_bits} is not supported (0 = float head, or one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))})")
        if self.group_size != -1 and self.group_size < 1:
            raise LowbitError(f"--group-size {self.group_size} is not supported (use -1 for per-row, or a positive size)")
        if not 0 < self.damp < 1e3:
            raise LowbitError(f"--damp {self.damp} must be positive")
        if not 0 <= self.beta < 1:
            raise LowbitError(f"--beta {self.beta} must be in [0, 1)")
        if self.pullback not in ("next", "all"):
            raise LowbitError(f"--pullback {self.pullback!r}: choose 'next' or 'all'")
        if not 0 <= self.outlier_frac < 0.5:
            raise LowbitError(f"--outlier-frac {self.outlier_frac} must be in [0, 0.5)")
        for flag, value, choices in (("--saliency", self.saliency, ("grad", "hessian", "magnitude")),
                                     ("--outlier-select", self.outlier_select, ("matrix", "row", "group")),
                                     ("--gwq-solver", self.gwq_solver, ("gptq", "rtn"))):
            if value not in choices:
                raise LowbitError(f"{flag} {value!r}: choose {', '.join(choices)}")
        if not 0 <= self.binary_frac <= 1:
            raise LowbitError(f"--binary-frac {self.binary_frac} must be in [0, 1]")
        if not 2 <= self.high_bits <= 8:
            raise LowbitError(f"--high-bits {self.high_bits} is not supported (2..8)")
        if self.squeeze_score not in ("pbar", "magnitude"):
            raise LowbitError(f"--squeeze-score {self.squeeze_score!r}: choose pbar or magnitude")
        if self.binary_residual and self.method != Method.SQUEEZE:
            raise LowbitError("--binary-residual applies only to --method squeeze")
        if self.block_size < 1:
            raise LowbitError(f"--block-size {self.block_size} must be positive")
        if self.codebook not in ("e8p", "scalar"):
            raise LowbitError(f"--codebook {self.codebook!r}: choose e8p or scalar")
        if self.method == Method.QUIP and self.bits not in (2, 3, 4):
            raise LowbitError(f"--bits {self.bits} is not supported by --method quip (choose 2, 3 or 4)")
        if self.method != Method.QUIP:
            for flag, off in (("--codebook", self.codebook == "e8p"), ("--no-rht", self.rht)):
                if not off:
                    raise LowbitError(f"{flag} applies only to --method quip")
        if self.finetune and self.method not in (Method.QUIP, Method.SQUEEZE):
            raise LowbitError("--finetune applies only to --method quip or squeeze")
        if self.ft_steps < 0 or not 0 < self.ft_lr < 1:
            raise LowbitError(f"--ft-steps {self.ft_steps} / --ft-lr {self.ft_lr}: steps must be >= 0, lr in (0, 1)")

        if self.gguf_type is not None:
            self._check_gguf()

    def _check_gguf(self) -> None:
        from .gguf import get

        object.__setattr__(self, "gguf_type", get(self.gguf_type).name)
        if self.method not in (Method.RTN, Method.GPTQ, Method.FOEM):
            raise LowbitError(f"--gguf-type applies to --method rtn, gptq or foem, not {self.method.value}")
        if self.act_order and not self.static_groups:
            raise LowbitError("--gguf-type: GGUF has no g_idx, so act-order needs static groups (drop --no-static-groups)")

    def group_size_for(self, n: int) -> int:
        """Effective group size for a row of ``n`` columns (per-row when -1 or larger than n)."""
        return n if self.group_size == -1 or self.group_size > n else self.group_size

    def to_json(self) -> dict:
        d = asdict(self)
        d["method"] = self.method.value
        if d["gguf_type"] is None:  # absent unless used: other methods' lowbit.json stay as they were
            del d["gguf_type"]
        return d


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration data comes from and how the runner processes it."""

    source: str = "default"       # 'default' (embedded corpus, calibration plays), a file, folder or dataset
    nsamples: int = 64            # windows drawn
    seqlen: int = 512             # tokens per window
    seed: int = 0                 # window offsets (private generator; global RNG untouched)
    batch_size: int = 0           # windows per forward pass in the runner; 0 = auto (65 536 tokens)
    dtype: str = "auto"           # activations' dtype in the runner: auto = bfloat16 on CPU/CUDA if supported
    true_sequential: bool = True  # re-run the block between linear groups (q/k/v, o, gate/up, down)
    fp_targets: bool | None = None  # FIAS: layer targets from the FP model's stream (calib/fias.py; None = on for squeeze only)
    grad_samples: int = 16        # GWQ: calibration windows back-propagated for Σ|∂L/∂W|
    grad_checkpointing: bool = False  # GWQ: recompute each block in the backward pass (less memory)
    offload: str = "none"         # "disk": blocks' weights stay in the safetensors files until quantized (lowbit.models.offload)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.nsamples < 1:
            raise LowbitError(f"--nsamples {self.nsamples} must be >= 1")
        if self.seqlen < 2:
            raise LowbitError(f"--seqlen {self.seqlen} must be >= 2")
        if self.grad_samples < 1:
            raise LowbitError(f"--grad-samples {self.grad_samples} must be >= 1")
        if self.batch_size < 0:
            raise LowbitError(f"--batch-size {self.batch_size} must be >= 0 (0 = auto)")
        if self.offload not in ("none", "disk"):
            raise LowbitError(f"--offload {self.offload!r}: choose none or disk")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LowbitError(f"--calib-dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")

    def windows_per_batch(self) -> int:
        """Micro-batch size: as set, or as many windows as fit 65 536 tokens (at least one)."""
        return self.batch_size or max(1, min(self.nsamples, 65536 // self.seqlen))

    def to_json(self) -> dict:
        return asdict(self)
