"""``--rotate`` (lowbit.models.rotate): the folded residual rotation is exact in float, refused where it is not,
and a rotated + quantized model saves, loads back and exports to a GGUF that the gguf package and transformers'
GGUF loader read back as lowbit's own weights (norms written as ones, the untied head as ``output``)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lowbit
from helpers import run_cli
from lowbit.errors import LowbitError
from lowbit.models.arch import resolve_spec
from lowbit.models.rotate import Rotation, rotate_model

# float32 logits of magnitude ~3 after a float64 rotation stored back in float32: measured |Δ| ≈ 2e-6
LOGIT_ATOL = 1e-4


def _float_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("d", [64, 576, 154])
def test_rotation_is_orthogonal_and_hadamard_where_one_exists(d):
    r = Rotation(d, seed=0)
    Q = r.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    K, P, hadamard = r.factors
    assert K * P == d and hadamard == (d != 154)  # 576 = 36·16 (Paley II ⊗ Sylvester); 154 = 77·2 has no H_77
    if hadamard:  # a Hadamard matrix: every entry ±1/√d
        assert torch.allclose(Q.abs(), torch.full_like(Q, 1 / math.sqrt(d)), atol=1e-12)
    assert torch.equal(Q, Rotation(d, seed=0).matrix()) and not torch.equal(Q, Rotation(d, seed=1).matrix())
    x = torch.randn(3, d, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ Q, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_float_logits_are_unchanged(tiny_models, family):
    model = _float_model(tiny_models[family])
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():  # norms away from 1, so the fold matters
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    emb0 = model.get_input_embeddings().weight.detach().clone()
    rec = rotate_model(model, resolve_spec(model))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < LOGIT_ATOL
    assert (model.get_input_embeddings().weight - emb0).abs().max() > 0.01  # the weights did move
    layer = model.model.layers[0]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    tied = family == "llama"  # the tiny llama ties its head; qwen3's is separate
    assert rec["untied_head"] is tied and model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", ["gemma3", "opt"])
def test_architectures_it_is_not_exact_for_are_refused_by_name(tiny_models, family):
    model = _float_model(tiny_models[family])
    mt = model.config.model_type
    with pytest.raises(LowbitError, match=f"not exact for architecture '{mt}'"):
        rotate_model(model, resolve_spec(model))


def test_offload_is_refused(tiny_models, tmp_path):
    with pytest.raises(LowbitError, match="--rotate needs the whole float model"):
        lowbit.quantize(str(tiny_models["llama"]), method="rtn", rotate=True, offload="disk", out=tmp_path / "o",
                        progress=False)


def _gguf_tensors(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def _check_export(folder, gguf_path, family):
    """The GGUF holds lowbit's weights: quantized layers, the rotated embedding, the untied head, norms of ones."""
    from lowbit.export.gguf import permute_rows
    from lowbit.packed.qlinear import QuantLinear

    got = _gguf_tensors(gguf_path)
    model, _, meta = lowbit.load(folder, device="cpu", dtype=torch.float32)
    assert meta["config"]["rotate"] is True and meta["rotation"]["hidden_size"] == model.config.hidden_size
    assert "output.weight" in got  # the head is untied (llama: it was tied before)
    np.testing.assert_array_equal(got["output.weight"][1], model.lm_head.weight.detach().numpy())
    np.testing.assert_array_equal(got["token_embd.weight"][1], model.model.embed_tokens.weight.detach().numpy())
    norms = [k for k in got if k.endswith((".attn_norm.weight", ".ffn_norm.weight")) or k == "output_norm.weight"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    for k in norms:
        assert np.array_equal(got[k][1], np.ones_like(got[k][1])), k
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            g = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[rest]
            w = mod.packed.dequantize().numpy()
            if family == "llama" and g in ("attn_q", "attn_k"):
                c = model.config
                w = permute_rows(w, c.num_attention_heads if g == "attn_q" else c.num_key_value_heads)
            np.testing.assert_array_equal(got[f"blk.{i}.{g}.weight"][1], w)
            n += 1
    assert n == 7 * model.config.num_hidden_layers
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rotated_quantized_model_saves_loads_and_exports(tiny_models, tmp_path, capsys, family):
    out, gg = tmp_path / "q", tmp_path / "m.gguf"
    assert run_cli(capsys, "quantize", str(tiny_models[family]), "--method", "rtn", "--gguf-type", "Q4_0", "--rotate",
                   "--out", str(out), "--quiet") == (0, "")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert run_cli(capsys, "export", str(out), "--format", "gguf", "--out", str(gg))[0] == 0
    model = _check_export(out, gg, family)
    if family != "llama":  # transformers' GGUF loader assumes head size 128 for qwen3 (see test_export)
        return
    from transformers import AutoModelForCausalLM

    gmodel = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gg.name, dtype=torch.float32).eval()
    assert gmodel.config.tie_word_embeddings is False
    ids = torch.randint(3, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = gmodel(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - b).abs().max() < LOGIT_ATOL


def test_rotated_model_keeps_the_float_model_s_function(tiny_models, tmp_path):
    """Quantizing at 8 bits, rotated or not, lands near the float model: the rotation itself costs nothing."""
    src = str(tiny_models["llama"])
    ref = _float_model(src)
    ids = torch.randint(3, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = ref(input_ids=ids).logits
    res = lowbit.quantize(src, method="rtn", bits=8, group_size=32, rotate=True, progress=False)
    with torch.no_grad():
        q = res.model(input_ids=ids).logits
    assert res.meta["rotation"]["untied_head"] is True and res.meta["config"]["rotate"] is True
    assert (q - fp).abs().max() < 0.05 * fp.abs().max()
