"""Validated configuration: one frozen dataclass per concern, built by the CLI or the Python API.

Nothing below the CLI sees command-line arguments: solvers read :class:`QuantConfig` (the shared
:class:`GridConfig` plus the method's own options, :mod:`lowbit.methods`), the runner reads
:class:`CalibConfig`.  Both are saved in ``lowbit.json`` next to every artifact (only the settings that
apply).  Every field is made with :func:`lowbit.options.option`: the CLI's flags are generated from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from .errors import LowbitError
from .options import change_flag, default_of, int_range, option


class Method(str, Enum):
    """The methods lowbit was built with, as constants (the registry, :mod:`lowbit.methods`, is the list)."""

    RTN = "rtn"    # round-to-nearest on the group grid; data-free
    GPTQ = "gptq"  # column-feedback with the calibration Hessian (Frantar et al. 2022)
    FOEM = "foem"  # GPTQ + first-order error compensation (arXiv 2507.11017)
    GWQ = "gwq"    # gradient-selected fp16 outliers + GPTQ/RTN for the rest (arXiv 2411.00850)
    SQUEEZE = "squeeze"  # staged 1-bit/4-bit mixed precision with PBAR and FIAS (arXiv 2507.18073)
    DLQAT = "dlqat"  # LoRA + group-magnitude quantization-aware training, see lowbit.qat (arXiv 2504.09223)
    QUIP = "quip"  # RHT incoherence + BlockLDLQ with the E8P lattice codebook, RVQ for 3/4 bits (arXiv 2402.04396)


SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


class MethodName(str):
    """A method's name (``cfg.method``): a plain string equal to the :class:`Method` member of the same value,
    with ``.value`` for code written against the enum; a method added as a file has no enum member."""

    @property
    def value(self) -> str:
        return str(self)


def _gguf_name(name: str) -> str:
    """The canonical spelling of a ``--gguf-type`` (a GGUF type or a llama.cpp preset; :mod:`lowbit.gguf`)."""
    from .gguf import canonical

    return canonical(name)


@dataclass(frozen=True)
class GridConfig:
    """The settings every method shares: the integer grid and the GPTQ-family column feedback."""

    bits: int = option(4, "code width in bits", choices=SUPPORTED_BITS)
    group_size: int = option(128, "columns sharing a scale; -1 = one group per row; need not divide n", metavar="N")
    sym: bool = option(False, "symmetric grid (zero = 2^(bits-1)) instead of asymmetric")
    act_order: bool = option(True, "GPTQ family: quantize columns by decreasing Hessian diagonal (static groups keep "
                                   "it free)")
    static_groups: bool = option(True, "with --act-order: fit the group grids before permuting, so groups stay "
                                       "contiguous (off: groups in permuted order, stores g_idx)",
                                 negate="--no-static-groups")
    damp: float = option(0.01, "GPTQ family: λ in H + λ·mean(diag H)·I, raised ×10 on failure")
    block_size: int = option(128, "GPTQ family: lazy-update block width (columns)")
    mse: bool = option(True, "shrink each group's range by an MSE search (1.0 … 0.8)")
    head_bits: int = option(0, "also quantize the output head (lm_head) with RTN at this width, symmetric, groups of "
                               "32 (0: keep it float, as GPTQ tools do; llama.cpp quantizes it)",
                            choices=(0,) + SUPPORTED_BITS)
    gguf_type: str | None = option(None, "a GGUF type (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL Q2_K … Q6_K, see lowbit.gguf) "
                                         "or a llama.cpp preset (Q4_K_M…, per-tensor types): rtn/gptq/foem/awq/dlqat/quip on its "
                                         "grid, stored as its blocks; rows it cannot hold fall back as llama.cpp "
                                         "does", metavar="TYPE")
    embedding_type: str | None = option(None, "store the token embedding (and the output head: the same table when "
                                              "tied) on this GGUF type, RTN as llama-quantize; auto = llama-quantize's "
                                              "choice for --gguf-type (the default with a preset); F16 = keep them "
                                              "float (the default otherwise)", metavar="TYPE")
    rotate: bool | None = option(None, "fold a seeded Hadamard rotation of the residual stream into the float model "
                                       "before the method runs (exact; a tied head is untied; lowbit.models.rotate) "
                                       "(default: on for quip with --gguf-type, off otherwise)", type=bool)
    gguf_refit: int | None = option(None, "GGUF types, GPTQ/FOEM/QuIP#/AWQ: rounds of re-fitting the fp16 block "
                                          "scales to the layer's full Hessian with the codes fixed, then solving the "
                                          "codes again with those scales (lowbit.gguf.refit; never raises a row's "
                                          "proxy loss; 0 = off; default: 1 where it applies, 0 otherwise)",
                                    metavar="N", type=int)
    target_bpw: float | None = option(None, "choose each linear's GGUF type (from --bpw-candidates) for the least "
                                            "total proxy error with the GGUF file at most B bits per weight "
                                            "(lowbit.gguf.budget); instead of --gguf-type", metavar="B", type=float)
    bpw_candidates: str | None = option(None, "--target-bpw: the GGUF types to choose from, e.g. Q3_K,Q4_K,IQ4_NL "
                                              "(default Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0)", metavar="TYPES")

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LowbitError(f"--bits {self.bits} is not supported (choose from {', '.join(map(str, SUPPORTED_BITS))})")
        if self.head_bits and self.head_bits not in SUPPORTED_BITS:
            raise LowbitError(f"--head-bits {self.head_bits} is not supported (0 = float head, or one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))})")
        if self.group_size != -1 and self.group_size < 1:
            raise LowbitError(f"--group-size {self.group_size} is not supported (use -1 for per-row, or a positive size)")
        if not 0 < self.damp < 1e3:
            raise LowbitError(f"--damp {self.damp} must be positive")
        if self.block_size < 1:
            raise LowbitError(f"--block-size {self.block_size} must be positive")
        if self.gguf_refit is not None and (self.gguf_refit < 0 or (self.gguf_refit and self.gguf_type is None
                                                                     and self.target_bpw is None)):
            raise LowbitError(f"--gguf-refit {self.gguf_refit}: a number of rounds ≥ 0, with --gguf-type or "
                              "--target-bpw")
        if self.gguf_type is not None:
            object.__setattr__(self, "gguf_type", _gguf_name(self.gguf_type))
            if self.act_order and not self.static_groups:
                raise LowbitError("--gguf-type: GGUF has no g_idx, so act-order needs static groups (drop "
                                  "--no-static-groups)")
        if self.target_bpw is not None or self.bpw_candidates is not None:
            self._check_budget()
        if self.embedding_type is not None or self.gguf_type is not None:
            from .gguf.embedding import check_option

            object.__setattr__(self, "embedding_type", check_option(self))

    def _check_budget(self) -> None:
        """``--target-bpw`` / ``--bpw-candidates``: a finite positive target, GGUF type names, no ``--gguf-type``."""
        from .gguf.budget import candidates_of

        if self.target_bpw is None:
            raise LowbitError("--bpw-candidates applies only with --target-bpw")
        b = self.target_bpw
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < float("inf"):
            raise LowbitError(f"--target-bpw {b!r} must be a positive number of bits per weight")
        if self.gguf_type is not None:
            raise LowbitError(f"--target-bpw chooses the types itself: drop --gguf-type {self.gguf_type} (list the "
                              "types to choose from with --bpw-candidates)")
        if self.act_order and not self.static_groups:
            raise LowbitError("--target-bpw: GGUF has no g_idx, so act-order needs static groups (drop "
                              "--no-static-groups)")
        object.__setattr__(self, "target_bpw", float(b))
        if self.bpw_candidates is not None:
            object.__setattr__(self, "bpw_candidates", ",".join(candidates_of(self.bpw_candidates)))

    def group_size_for(self, n: int) -> int:
        """Effective group size for a row of ``n`` columns (per-row when -1 or larger than n)."""
        return n if self.group_size == -1 or self.group_size > n else self.group_size

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("gguf_type", "embedding_type", "target_bpw", "bpw_candidates"):
            if d[k] is None:  # absent unless used
                del d[k]
        if not d["rotate"]:  # absent unless on (QuantConfig.to_json writes false where the method's default is on)
            del d["rotate"]
        return d


_GRID = {f.name: f for f in fields(GridConfig)}
_UNSET = object()


def _owners(name: str) -> list:
    """The registered methods whose options have a setting ``name``."""
    from .methods import REGISTRY

    return [m for m in REGISTRY.values() if name in {f.name for f in fields(m.options)}]


def applicable(config: dict, method: str | None = None) -> dict:
    """The settings of a saved ``config`` (``lowbit.json``) that apply to its method: ``method``, the grid's and
    the method's options (``gguf_type`` only when set).  An old ``lowbit.json`` listed every method's settings;
    an unknown method keeps everything."""
    from .methods import REGISTRY

    name = str(method or config.get("method") or "gptq")
    if name not in REGISTRY:
        return dict(config)
    keep = {"method"} | set(_GRID) | {f.name for f in fields(REGISTRY[name].options)}
    return {k: v for k, v in config.items()
            if k in keep and not (k in ("gguf_type", "embedding_type", "target_bpw", "bpw_candidates") and v is None)}


def known_settings() -> set[str]:
    """Every setting name some method has (``method``, the grid's, every registered method's options)."""
    from .methods import REGISTRY

    return {"method"} | set(_GRID) | {f.name for m in REGISTRY.values() for f in fields(m.options)}


@dataclass(frozen=True, init=False)
class QuantConfig:
    """How each linear weight is quantized: ``method``, the shared :class:`GridConfig` and the method's own
    options (the ``options`` dataclass of its :class:`lowbit.methods.base.MethodSpec`).

    Built from flat settings as before, ``QuantConfig(method="foem", bits=3, beta=0.2)``: each goes to the grid
    or to the method's options; a non-default value of another method's option is refused ("--beta applies
    only to --method foem"), ``None`` means "the default".  Reading ``cfg.bits`` or ``cfg.beta`` reads the grid
    or the options; another method's setting reads as its default (its off state: ``cfg.pullback`` of a GPTQ
    config is ``"next"``), so the solvers read one object."""

    method: MethodName
    grid: GridConfig
    options: object

    def __init__(self, method="gptq", grid: GridConfig | None = None, options=None, **settings):
        from .methods import get

        spec = get(method)
        own = {f.name: f for f in fields(spec.options)}
        gkw = {} if grid is None else {f: getattr(grid, f) for f in _GRID}
        okw: dict = {}
        if options is not None:  # dataclasses.replace(cfg, method=...) passes the old method's options along
            values = {f.name: getattr(options, f.name) for f in fields(options)}
            if isinstance(options, spec.options):
                okw = values
            else:
                settings = {**values, **settings}
        for k, v in settings.items():
            if k in _GRID or k in own:
                f = _GRID.get(k) or own[k]
                if not (v is None and f.default is not None):  # None: the default
                    (gkw if k in _GRID else okw)[k] = v
                continue
            owners = sorted(_owners(k), key=lambda m: m.name)
            if not owners:
                raise LowbitError(f"unknown setting {k!r}")
            fs = [next(f for f in fields(m.options) if f.name == k) for m in owners]
            if v is not None and all(v != default_of(f) for f in fs):
                raise LowbitError(f"{change_flag(fs[0], v)} applies only to --method "
                                  f"{' or '.join(m.name for m in owners)}")
        grid = GridConfig(**gkw)
        options = spec.options(**okw)
        check = getattr(options, "check_grid", None)
        if check is not None:
            check(grid)
        if grid.rotate is None:  # --rotate not given: the method's default (options.rotate_default(grid)), else off
            auto = getattr(options, "rotate_default", None)
            object.__setattr__(grid, "rotate", bool(auto(grid)) if auto is not None else False)
        if grid.gguf_type is not None and not spec.gguf:
            from .methods import REGISTRY

            ok = [m.name for m in REGISTRY.values() if m.gguf]
            raise LowbitError(f"--gguf-type applies to --method {', '.join(ok[:-1])} or {ok[-1]}, not {spec.name}")
        hessian = spec.name in ("gptq", "foem", "quip", "awq") and getattr(options, "awq_solver", "gptq") != "rtn"
        if grid.gguf_refit is None:  # not given: one round wherever it applies (a GGUF grid and a Hessian solve)
            on = hessian and (grid.gguf_type is not None or grid.target_bpw is not None)
            object.__setattr__(grid, "gguf_refit", int(on))
        if grid.gguf_refit and not hessian:
            raise LowbitError(f"--gguf-refit re-fits a Hessian solve: it applies to --method gptq, foem, quip or awq "
                              f"(--awq-solver gptq), not {spec.name}{' --awq-solver rtn' if spec.name == 'awq' else ''}")
        if grid.target_bpw is not None and not spec.gguf:
            from .methods import REGISTRY

            ok = [m.name for m in REGISTRY.values() if m.gguf]
            raise LowbitError(f"--target-bpw applies to --method {', '.join(ok[:-1])} or {ok[-1]}, not {spec.name}")
        object.__setattr__(self, "method", MethodName(spec.name))
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "options", options)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("method", "grid", "options"):
            raise AttributeError(name)
        for part in (self.grid, self.options):
            if hasattr(part, name):
                return getattr(part, name)
        owners = _owners(name)
        if owners:
            return default_of(next(f for f in fields(owners[0].options) if f.name == name))
        raise AttributeError(f"QuantConfig has no setting {name!r}")

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        """The config saved in a ``lowbit.json`` (also an old one, whose ``config`` lists every method's settings:
        the ones that do not apply to its method are ignored).  One written before ``gguf_refit`` existed ran
        without it: 0, not today's default."""
        return cls(**{"gguf_refit": 0, **applicable(d)})

    def replace(self, **changes) -> "QuantConfig":
        """A copy with ``changes`` (flat settings, ``method`` too)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """``{"method", the grid's settings, the method's options}``: only what applies (``gguf_type`` when set)."""
        grid = self.grid.to_json()
        auto = getattr(self.options, "rotate_default", None)
        if not self.grid.rotate and auto is not None and auto(self.grid):  # --no-rotate where the default is on
            grid["rotate"] = False
        return {"method": str(self.method), **grid, **asdict(self.options)}


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration data comes from and how the runner processes it."""

    source: str = option("default", "calibration text: default (the embedded plays) | FILE | DIR | HF dataset",
                         flag="--calib")
    nsamples: int = option(64, "calibration windows drawn")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "window offsets (private generator; the global RNG is untouched); DL-QAT: LoRA init and "
                          "batches too", type=int_range(-2**63, 2**63))
    batch_size: int = option(0, "calibration windows per forward pass in the runner (0 = auto: 65 536 tokens); "
                                "DL-QAT: windows per micro-batch (default 4)")
    dtype: str = option("auto", "activations' dtype in the runner: auto = bfloat16 where the hardware runs it fast",
                        flag="--calib-dtype", choices=("auto", "float32", "bfloat16", "float16"))
    true_sequential: bool = option(True, "re-run the block between linear groups (q/k/v, o, gate/up, down) "
                                         "(off: one forward per block for all Hessians)",
                                   negate="--no-true-sequential")
    fp_targets: bool | None = option(None, "FIAS: each layer reproduces the FP model's outputs from its quantized "
                                           "inputs (default: on for squeeze only)", type=bool)
    grad_samples: int = option(16, "GWQ: calibration windows back-propagated for Σ|∂L/∂W|")
    grad_checkpointing: bool = option(False, "GWQ: recompute each block in the backward pass (less memory)")
    offload: str = option("none", "disk: keep each block's weights in the safetensors files until it is quantized "
                                  "(memory bounded by one block)", choices=("none", "disk"))
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
