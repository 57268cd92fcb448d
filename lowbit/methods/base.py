"""What a quantization method is: one :class:`MethodSpec` per file in :mod:`lowbit.methods`, registered in
one table (:data:`REGISTRY`, filled by :func:`register` when :mod:`lowbit.methods` imports its modules).

A method declares everything the rest of the package needs to know about it, so nothing outside its file
branches on its name:

* ``name`` — the ``--method`` value and ``lowbit.json``'s ``"method"``; ``title`` — one line for ``--help``
  and the report (the paper);
* ``options`` — a frozen dataclass of the method's own settings, each field made with :func:`option` (help
  text, the CLI flag, choices), validated in its ``__post_init__``; the CLI, ``lowbit.json``, ``lowbit info``
  and the report's rebuild command are all generated from it;
* ``needs`` — what the engine must compute for it (:data:`NEEDS`);
* ``solve(W (m, n) float32, H (n, n) | None, cfg, **extra) -> (packed, info)`` — the per-layer solver the
  calibration runner calls (``cfg`` is the full :class:`lowbit.config.QuantConfig`: grid + these options;
  with ``"gradients"`` in ``needs`` it gets ``saliency=`` the layer's ``Σ|∂L/∂W|`` (m, n) or ``None``);
* ``prepare_block(block, inputs, calls, spec, cfg, prefix=, n_layers=, gguf_types=) -> dict | None`` — optional
  float transform of one decoder block *before* its linears are solved (AWQ's scales folded into the norm and
  the linears): ``block`` the model's float block in place, ``inputs`` its calibration micro-batches
  ``(B, T, d)``, ``calls`` their ``(args, kwargs)``, ``spec`` the :class:`lowbit.models.arch.ArchSpec`;
  ``prefix`` the block's dotted name, ``n_layers`` the model's blocks and ``gguf_types`` a ``--target-bpw``
  plan's ``{layer: type}`` (what a GGUF preset or plan needs to know each linear's type);
* ``finetuner(cfg, progress) -> callback | None`` — optional per-block fine-tuning after the solve
  (the runner's ``finetune_block``; :func:`finetuner` makes one for a packed kind);
* ``run(ctx) -> {layer: (packed, info)}`` — optional own loop instead of the calibration runner
  (RTN: data-free; DL-QAT: training); ``ctx`` is :class:`RunContext`;
* ``offload`` / ``resume`` / ``processes`` — whether ``--offload disk``, ``--resume`` and torchrun apply
  (``offload`` may instead be ``cfg -> reason it does not apply, or None``: GWQ refuses it only with
  ``--saliency grad``);
* ``produces`` — the packed format's ``kind``;
* ``needs_for(cfg) -> frozenset`` — optional: what one run needs when it depends on the options (GWQ needs
  gradients only with ``--saliency grad``); :meth:`MethodSpec.needs_of` answers for a config;
* ``order`` — position in ``--help`` and error listings;
* ``gguf`` — whether ``--gguf-type`` applies (the solver then runs on a GGUF type's own grid);
* ``run_options`` — optional second settings dataclass of the own loop (DL-QAT's
  :class:`lowbit.qat.config.QATConfig`): its fields are CLI flags in the method's group, it is saved under
  ``run_key`` in ``lowbit.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LowbitError
from ..options import option  # noqa: F401  (the field helper every method's options use)

NEEDS = frozenset({
    "calibration",  # calibration windows through the runner (block inputs, Hessians XᵀX)
    "gradients",    # Σ|∂L/∂W| over calibration windows before the runner (GWQ's saliency)
    "train_text",   # a training text (DL-QAT)
    "fp_targets",   # FIAS: the float model's stream beside the quantized one, on by default
})


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


@dataclass(frozen=True)
class FinetuneOptions:
    """Per-block fine-tuning after the solve (QuIP#, Squeeze10): Adam on the packed weight's trainable parts
    against the float block's outputs.  A method's options inherit these and may override ``ft_lr``'s default."""

    finetune: bool = option(False, "per-block Adam on the packed weights' trainable parts vs the FP block outputs")
    ft_steps: int = option(50, "--finetune: Adam steps per block")
    ft_lr: float = option(1e-3, "--finetune: Adam learning rate")

    def __post_init__(self):
        if self.ft_steps < 0 or not 0 < self.ft_lr < 1:
            raise LowbitError(f"--ft-steps {self.ft_steps} / --ft-lr {self.ft_lr}: steps must be >= 0, lr in (0, 1)")


@dataclass
class RunContext:
    """What a method's own loop (``MethodSpec.run``) gets: the float model, its tokenizer, arch spec and settings."""

    model: Any
    tokenizer: Any
    spec: Any
    quant: Any        # lowbit.config.QuantConfig
    calib: Any        # lowbit.config.CalibConfig
    device: str
    progress: bool
    out: Any = None   # the output folder (its OUT.work/ holds checkpoints) or None
    resume: bool = False
    offload: Any = None  # lowbit.models.offload.DiskOffload or None
    extra: dict = field(default_factory=dict)  # e.g. DL-QAT's QATConfig under "qat"; stats come back here
    solve: Callable | None = None  # (W, H, name) -> (packed, info): the grid's solver (GGUF types included)


@dataclass(frozen=True)
class MethodSpec:
    """One quantization method (see the module docstring)."""

    name: str
    title: str
    options: type = NoOptions
    solve: Callable | None = None
    needs: frozenset = frozenset({"calibration"})
    prepare_block: Callable | None = None
    finetuner: Callable | None = None
    run: Callable | None = None
    offload: bool = True
    resume: bool = True
    processes: bool = True
    produces: str = "int"
    needs_for: Callable | None = None
    gguf: bool = False
    run_options: type | None = None
    run_key: str | None = None
    order: int = 100  # position in --help and listings (the README's order); ties by name

    def needs_of(self, cfg) -> frozenset:
        """What a run of this method with settings ``cfg`` needs (a subset of :data:`NEEDS`)."""
        return frozenset(self.needs_for(cfg)) if self.needs_for is not None else self.needs

    def offload_refusal(self, cfg) -> str | None:
        """Why ``--offload disk`` does not apply to this run, or ``None`` when it does."""
        if callable(self.offload):
            return self.offload(cfg)
        return None if self.offload else "(it needs the whole float model)"

    def __post_init__(self):
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"method {self.name}: unknown needs {sorted(unknown)}")
        if (self.solve is None) == (self.run is None) and self.run is None:
            raise ValueError(f"method {self.name}: give solve (runner) or run (own loop)")


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`REGISTRY` (called once, at the bottom of each method file)."""
    if spec.name in REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def finetuner(kind: str) -> Callable:
    """``MethodSpec.finetuner`` for options with :class:`FinetuneOptions`: the one per-block loop of
    :mod:`lowbit.calib.finetune` on the trainable view of packed ``kind``, built only with ``--finetune``."""
    def make(cfg, progress: bool):
        if not cfg.finetune:
            return None
        from ..calib.finetune import block_finetuner

        return block_finetuner(kind, cfg.ft_steps, cfg.ft_lr, progress)
    return make
