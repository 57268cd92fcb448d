"""``--rotate``: fold an orthogonal rotation ``Q`` (d, d) of the residual stream into the float model, exactly.

Row vectors throughout: the residual stream ``h`` (B, T, d), a linear ``y = x Wᵀ + b`` with ``W`` (out, in).

1. **Fold the RMSNorms.**  ``norm(x) = x / rms(x) ⊙ g`` with ``rms(x) = √(mean(x²) + ε)``; a linear reading it
   computes ``(x / rms(x)) (W diag(g))ᵀ``, so ``W ← W diag(g)`` and ``g ← 1`` (``input_layernorm`` → q/k/v,
   ``post_attention_layernorm`` → gate/up, the final ``norm`` → the head).
2. **Rotate** ``h ↦ h Q``.  Embedding ``E`` (V, d): ``E ← E Q``.  Readers (q/k/v, gate/up, head; ``W`` (out, d)):
   ``W ← W Q``, as ``(x Q)(W Q)ᵀ = x Wᵀ``.  Writers (o_proj, down_proj; ``W`` (d, in), bias ``b`` (d,)):
   ``W ← Qᵀ W``, ``b ← Qᵀ b``, so they add ``(z Wᵀ + b) Q`` to the rotated stream.  A norm of weight 1 commutes
   with ``Q``: ``mean((hQ)²) = ‖hQ‖²/d = ‖h‖²/d`` (ε included), so ``norm(h Q) = norm(h) Q``; attention,
   the MLP's activation and Qwen3's per-head q/k norms act inside the blocks, after a reader and before a writer,
   and never see ``Q``.  Hence every logit is unchanged (up to float rounding: the products are computed
   in float64 and stored back in the model's dtype).
3. **A tied head** (head = ``E``) cannot stay tied: the head is ``E diag(g) Q``, the table ``E Q``.  It is untied
   (``config.tie_word_embeddings = False``, a separate ``lm_head.weight``): V·d more stored weights
   (SmolLM2-135M: 49 152 × 576 = 28.3 M, +57 MB in fp16, an ``output`` tensor beside ``token_embd`` in GGUF).
   Keeping ``g`` in the final norm instead would not commute with ``Q``.

**Q** = ``diag(s) (A ⊗ B)ᵀ`` with ``d = K·P``, ``P = 2^p``: ``B = H_P/√P`` (Sylvester), ``A = H_K/√K`` the
constructible Hadamard matrix of :func:`lowbit.quip.hadamard.hadamard_factor` (Paley I/II, Sylvester,
Kronecker; then ``Q`` is a Hadamard matrix, entries ±1/√d: d = 576 = 36·16 on the demo model), or, for a
``d`` with no constructible ``H_K`` (K its odd part), a Haar-random orthogonal ``A`` (QR of a seeded Gaussian);
``s`` ∈ {±1}ᵈ seeded signs (own ``torch.Generator``).  ``x Q = (A ⊗ B)(s ⊙ x)``: the row-major view ``X``
(K, P) of ``s ⊙ x`` becomes ``A X Bᵀ`` (fast Walsh–Hadamard over P, a K×K product), O(d·(K + log P)) per row.

Exact only where every norm on the residual stream is an RMSNorm of this form and every other read or write of
the stream is one of these linears: llama, mistral, qwen2, qwen3 (:data:`EXACT`, each checked structurally);
other architectures are refused by name (:data:`NOT_EXACT`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..errors import LowbitError
from ..quip.hadamard import fwht, hadamard_factor, hadamard_matrix
from .arch import LLAMA_LIKE, ArchSpec, blocks_of

EXACT = ("llama", "mistral", "qwen2", "qwen3")
NOT_EXACT = {
    "gemma3_text": "its post-attention/post-feedforward norms act on the block outputs before they reach the residual "
                   "stream, and a norm weight does not commute with a rotation",
    "gemma3": "its post-attention/post-feedforward norms act on the block outputs before they reach the residual "
              "stream, and a norm weight does not commute with a rotation",
    "opt": "its LayerNorms subtract the mean (and add a bias), which a rotation does not commute with",
}
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Rotation:
    """``Q`` (d, d) of the module docstring, applied as ``x ↦ x Q`` over a last dim of size ``d`` (float64)."""

    d: int
    seed: int = 0

    @cached_property
    def factors(self) -> tuple[int, int, bool]:
        """``(K, P, hadamard)``: ``d = K·P``, and whether ``A`` is a Hadamard matrix (else random orthogonal)."""
        f = hadamard_factor(self.d)
        if f is not None:
            return f[0], f[1], True
        P = self.d & -self.d
        return self.d // P, P, False

    @cached_property
    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        K, _, had = self.factors
        g = torch.Generator().manual_seed(self.seed)
        s = torch.randint(0, 2, (self.d,), generator=g).double() * 2 - 1
        if had:
            A = hadamard_matrix(K).double() / math.sqrt(K)
        else:  # Haar: Q R of a Gaussian, columns' signs fixed by diag(R) > 0
            q, r = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
            A = q * torch.sign(torch.diagonal(r))
        return s, A

    def describe(self) -> str:
        K, P, had = self.factors
        a = (f"H{K}" if K > 1 else "") if had else f"random-orthogonal {K}x{K}"
        b = f"Sylvester H{P}" if P > 1 else ""
        return f"diag(random signs) · ({' ⊗ '.join(x for x in (a, b) if x) or '1'})ᵀ, normalized"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` for ``x`` (..., d), in float64 on ``x``'s device, returned in ``x``'s dtype."""
        K, P, _ = self.factors
        s, A = (t.to(x.device) for t in self._parts)
        y = (x.double() * s).reshape(*x.shape[:-1], K, P)
        if P > 1:
            y = fwht(y) / math.sqrt(P)
        if K > 1:
            y = torch.matmul(A, y)
        return y.reshape(x.shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """Q (d, d) float64 explicitly (tests)."""
        return self.apply(torch.eye(self.d, dtype=torch.float64))


def check_rotatable(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse, by name, a model the rotation is not exact for: its family, then its structure (an embedding, a
    final RMSNorm and a linear head of width d; per block exactly the two RMSNorms of :data:`READERS` on the
    stream and the seven linears of ``LLAMA_LIKE``)."""
    mt = getattr(model.config, "model_type", "?")
    if mt in NOT_EXACT:
        raise LowbitError(f"--rotate is not exact for architecture '{mt}': {NOT_EXACT[mt]}")
    if mt not in EXACT or spec.groups != LLAMA_LIKE or spec.norm_plus_one:
        raise LowbitError(f"--rotate is not exact for architecture '{mt}' (proved for {', '.join(EXACT)} only)")
    d = model.config.hidden_size
    inner = model.get_submodule(spec.blocks.rpartition(".")[0])
    head = model.get_output_embeddings()

    def rms(m) -> bool:
        return type(m).__name__.endswith("RMSNorm") and getattr(m, "bias", None) is None

    wrong = (None if isinstance(getattr(inner, "embed_tokens", None), nn.Embedding) else "embed_tokens") or \
        (None if rms(getattr(inner, "norm", None)) else "the final norm") or \
        (None if isinstance(head, nn.Linear) and head.in_features == d else "lm_head")
    want = {x for g in LLAMA_LIKE for x in g}
    for i, block in enumerate(blocks_of(model, spec)):
        if wrong:
            break
        norms = {n for n, m in block.named_modules() if n and not isinstance(m, nn.Linear)
                 and getattr(m, "weight", None) is not None and m.weight.shape == (d,)}
        lin = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if norms != set(READERS) or lin != want or not all(rms(getattr(block, n)) for n in READERS):
            wrong = f"block {i}: norms {sorted(norms)}"
    if wrong:
        raise LowbitError(f"--rotate: this {mt} model does not have the layout the rotation is proved for ({wrong})")


def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """``W ← W diag(g)`` for every linear reading ``norm``'s output, then ``g ← 1``."""
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.data = (lin.weight.detach().double() * g).to(lin.weight.dtype)
    norm.weight.data.fill_(1)


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ArchSpec, seed: int = 0) -> dict:
    """Fold the norms and ``Q`` into ``model`` in place (module docstring) -> the record for ``lowbit.json``:
    ``{"transform", "hidden_size", "seed", "untied_head", "folded_norms"}``."""
    check_rotatable(model, spec)
    d = model.config.hidden_size
    rot = Rotation(d, seed)
    inner = model.get_submodule(spec.blocks.rpartition(".")[0])
    emb, head = inner.embed_tokens, model.get_output_embeddings()
    untied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if untied:  # the head gets its own copy (E diag(g) Q differs from the table E Q)
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        model.config.tie_word_embeddings = False
    blocks = blocks_of(model, spec)
    folded = 0
    for block in blocks:
        for norm, names in READERS.items():
            _fold(getattr(block, norm), [block.get_submodule(n) for n in names])
            folded += 1
    _fold(inner.norm, [head])
    folded += 1
    emb.weight.data = rot.apply(emb.weight.detach())
    head.weight.data = rot.apply(head.weight.detach())
    for block in blocks:
        for names in READERS.values():
            for n in names:
                lin = block.get_submodule(n)
                lin.weight.data = rot.apply(lin.weight.detach())
        for n in WRITERS:
            lin = block.get_submodule(n)
            lin.weight.data = rot.apply(lin.weight.detach().T).T.contiguous()  # Qᵀ W = (Wᵀ Q)ᵀ
            if lin.bias is not None:
                lin.bias.data = rot.apply(lin.bias.detach())                  # Qᵀ b = (bᵀ Q)ᵀ
    return {"transform": rot.describe(), "hidden_size": d, "seed": seed, "untied_head": bool(untied),
            "folded_norms": folded}
