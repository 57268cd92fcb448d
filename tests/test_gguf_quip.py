"""``--method quip --gguf-type IQ2_XS`` (and IQ2_XXS, IQ2_S, IQ3_XXS, IQ3_S): BlockLDLQ on the I-quant grid with the
residual rotation on by default; what cannot apply is refused in one line; the GGUF it exports is what the gguf
package's dequantizer reads back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lowbit
from helpers import build_wide, down_proj_stats, run_cli
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.gguf.solve import solve
from lowbit.methods.quip import vector_types
from lowbit.solvers.loss import proxy_loss


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_wide(tmp_path_factory.mktemp("wide") / "llama", "llama")


@pytest.fixture(scope="module")
def rows(wide):
    """32 rows of block 1's down_proj (512 inputs: two IQ super-blocks) and its real Hessian."""
    W, H = down_proj_stats(wide, (wide / "calib.txt").read_text())
    return W[:32].contiguous(), H


@pytest.mark.parametrize("name", ["IQ2_XS", "IQ3_XXS"])
@pytest.mark.e2e  # the I-quant grid searches take tens of seconds even on 32 rows
def test_blockldlq_beats_rtn_on_the_grid(rows, name):
    W, H = rows
    rtn, _ = solve(W, H, QuantConfig(method="rtn", gguf_type=name))
    packed, info = solve(W, H, QuantConfig(method="quip", gguf_type=name))
    assert packed.gguf_type == name
    assert info["loss"] == pytest.approx(proxy_loss(W, packed.dequantize(), H), rel=1e-6)
    assert info["loss"] < 0.9 * proxy_loss(W, rtn.dequantize(), H), name
    # on a GGUF grid QuIP#'s BlockLDLQ is the feedback engine GPTQ uses there (lowbit.methods.quip's docstring)
    gptq, _ = solve(W, H, QuantConfig(method="gptq", gguf_type=name))
    assert torch.equal(gptq.blocks, packed.blocks)


def test_rotation_is_on_by_default_and_recorded():
    c = QuantConfig(method="quip", gguf_type="IQ2_XS")
    assert c.rotate is True and c.to_json()["rotate"] is True
    off = QuantConfig(method="quip", gguf_type="IQ2_XS", rotate=False)
    assert off.to_json()["rotate"] is False and QuantConfig.from_json(off.to_json()).rotate is False
    assert QuantConfig(method="quip").rotate is False and "rotate" not in QuantConfig(method="quip").to_json()
    assert QuantConfig(method="quip", gguf_type="MOSTLY_IQ2_XS").rotate is True  # a preset whose main type is IQ2_XS
    assert all(QuantConfig(method="quip", gguf_type=t).gguf_type == t for t in vector_types())
    assert set(vector_types()) == {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"}


@pytest.mark.parametrize("flags,message", [
    (["--gguf-type", "Q4_K"], "--method quip --gguf-type Q4_K: QuIP#'s BlockLDLQ applies to the I-quant vector grids"),
    (["--gguf-type", "IQ4_NL"], "on IQ4_NL use --method gptq --rotate"),
    (["--gguf-type", "IQ2_XS", "--no-rht"], "--no-rht does not apply with --gguf-type IQ2_XS"),
    (["--gguf-type", "IQ2_XS", "--codebook", "scalar"], "--codebook does not apply with --gguf-type IQ2_XS"),
    (["--gguf-type", "IQ2_XS", "--finetune"], "--finetune does not apply with --gguf-type IQ2_XS"),
])
def test_what_cannot_apply_is_refused_in_one_line(capsys, tmp_path, flags, message):
    code, err = run_cli(capsys, "quantize", "smollm2-135m", "--method", "quip", *flags, "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("lowbit: error: --") and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_quip_iq2_xs_exports_what_the_gguf_dequantizer_reads(wide, tmp_path):
    import gguf

    from lowbit.export.gguf import export_gguf, permute_rows
    from lowbit.packed.qlinear import QuantLinear

    out = tmp_path / "q"
    lowbit.quantize(str(wide), method="quip", gguf_type="IQ2_XS", source=str(wide / "calib.txt"), nsamples=4,
                    seqlen=64, out=out, progress=False)
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["config"]["rotate"] is True and meta["rotation"]["untied_head"] is True
    assert {l["gguf_type"] for l in meta["layers"].values()} == {"IQ2_XS"}
    r = export_gguf(out, tmp_path / "m.gguf")
    assert r["types"] == {"IQ2_XS": 14} and r["lossless"] == 14
    model, _, _ = lowbit.load(out, device="cpu")
    got = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type))
           for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    seen = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            w = mod.packed.dequantize().numpy()
            if rest in ("self_attn.q_proj", "self_attn.k_proj"):
                c = model.config
                w = permute_rows(w, c.num_attention_heads if "q_" in rest else c.num_key_value_heads)
            qtype, back = got[f"blk.{i}.{names[rest]}.weight"]
            assert qtype == "IQ2_XS"
            np.testing.assert_array_equal(back, w)
            seen += 1
    assert seen == 14 and "output.weight" in got
    assert np.array_equal(got["output_norm.weight"][1], np.ones_like(got["output_norm.weight"][1]))
