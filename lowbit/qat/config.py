"""DL-QAT training settings: one frozen, validated dataclass (``QATConfig``), saved under ``"qat"`` in
``lowbit.json``.  The grid (bits, group size, symmetric or not) comes from :class:`lowbit.config.QuantConfig`,
the training window length from :class:`lowbit.config.CalibConfig` (``seqlen``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LowbitError
from ..options import option

# Fixed design choices, recorded next to the settings so a checkpoint says how it was trained.
FORMULA = "W_hat = fp16(m*s) * (clamp(round((W0 + B A)/s) + z, 0, 2^b-1) - z)"
STE = "round: straight-through (identity gradient); clamp: exact gradient (0 outside the range); fp16(m*s): identity"
W0_OF_INIT = {"rtn": "original float weights", "gptq": "GPTQ dequantized weights s*(q-z)",
              "dir": "dequantized weights s*(q-z) of the lowbit checkpoint named by init"}


@dataclass(frozen=True)
class QATConfig:
    """How DL-QAT trains the group magnitudes ``m`` and the LoRA factors ``A``, ``B`` (see :mod:`lowbit.qat`)."""

    steps: int = option(200, "DL-QAT: optimizer steps")
    lora_rank: int = option(8, "DL-QAT: LoRA rank r (A is (r, n), B is (m, r))")
    lr: float = option(1e-3, "DL-QAT: AdamW peak learning rate (weight decay 0: it would pull m toward 0)")
    distill: bool = option(False, "DL-QAT: loss = KL to the FP model's logits instead of next-token CE")
    grad_accum: int = option(1, "DL-QAT: micro-batches of --batch-size windows (default 4) per step")
    batch_size: int = 4           # windows per micro-batch (window length = CalibConfig.seqlen; the CLI's --batch-size)
    warmup: int = option(-1, "DL-QAT: linear warm-up steps, then cosine decay to 0 (default 5% of --steps)")
    save_every: int = option(0, "DL-QAT: checkpoint the trainable tensors every K steps into OUT.work/ (0 = never)")
    init: str = option("rtn", "DL-QAT: grid and W0 from rtn (W0 = float weights), gptq (W0 = GPTQ's Ŵ) or the "
                              "folder of a lowbit int checkpoint of the same model")
    train_text: str | None = option(None, "DL-QAT: training text (default: --calib, i.e. the calibration plays)")
    seed: int = 0                 # LoRA init and window sampling (private generators; the CLI's --seed)
    resume: bool = False          # continue from the latest checkpoint in OUT.work/ if there is one (the CLI's --resume)
    max_grad_norm: float = option(1.0, "DL-QAT: gradient clipping (0 = off)")

    def __post_init__(self):
        checks = (("--steps", self.steps >= 1, "must be >= 1"),
                  ("--lora-rank", self.lora_rank >= 1, "must be >= 1"),
                  ("--lr", 0 < self.lr < 1, "must be in (0, 1)"),
                  ("--grad-accum", self.grad_accum >= 1, "must be >= 1"),
                  ("--batch-size", self.batch_size >= 1, "must be >= 1"),
                  ("--warmup", -1 <= self.warmup <= self.steps, f"must be -1 (auto) or 0..{self.steps} (--steps)"),
                  ("--save-every", self.save_every >= 0, "must be >= 0 (0 = never)"),
                  ("--max-grad-norm", self.max_grad_norm >= 0, "must be >= 0"))
        for flag, ok, why in checks:
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise LowbitError(f"{flag} {value} {why}")
        if self.init not in ("rtn", "gptq") and not (Path(self.init) / "lowbit.json").is_file():
            raise LowbitError(f"--init {self.init!r}: choose rtn, gptq or a lowbit checkpoint folder")

    @classmethod
    def from_flags(cls, given: dict, calib) -> "QATConfig":
        """From the DL-QAT flags the user gave (``given``) and the shared ``--seed`` / ``--batch-size``
        (:class:`lowbit.config.CalibConfig`; its 0 = auto keeps the default 4)."""
        return cls(**given, seed=calib.seed, **({"batch_size": calib.batch_size} if calib.batch_size else {}))

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 20) if self.warmup < 0 else self.warmup

    def to_json(self) -> dict:
        return {**asdict(self), "warmup_steps": self.warmup_steps, "w0": W0_OF_INIT.get(self.init, W0_OF_INIT["dir"]),
                "formula": FORMULA, "ste": STE, "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0)",
                "schedule": "linear warm-up, cosine decay to 0"}
