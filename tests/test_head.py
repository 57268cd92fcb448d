"""`--head-bits`: the output head quantized too (RTN, groups of 32), tied embeddings untied on save."""
import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.sources import load_model
from lowbit.packed.qlinear import QuantLinear


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied (llama here) and untied embeddings
def test_head_bits_quantizes_the_head_and_round_trips(tiny_models, tiny_text, tmp_path, family):
    src = str(tiny_models[family])
    fp, _, _ = load_model(src)
    tied = bool(fp.config.tie_word_embeddings)
    assert tied == (family == "llama")
    out = tmp_path / "q"
    r = lowbit.quantize(src, method="gptq", bits=4, group_size=32, head_bits=8, source=str(tiny_text),
                        nsamples=4, seqlen=32, out=out, progress=False)
    assert isinstance(r.model.lm_head, QuantLinear) and r.meta["layers"]["lm_head"]["bits"] == 8
    assert r.meta["config"]["head_bits"] == 8
    # the head is close to the float head (8-bit), the embedding table is untouched
    W, Wq = fp.lm_head.weight.detach(), r.model.lm_head.packed.dequantize()
    assert 0 < ((Wq - W).norm() / W.norm()).item() < 0.01
    assert torch.equal(r.model.get_input_embeddings().weight, fp.get_input_embeddings().weight)
    model, _, meta = lowbit.load(out)
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, r.model(ids).logits, atol=3e-3, rtol=1e-3)  # fp16-stored floats
        emb = model.get_input_embeddings().weight
        assert torch.allclose(emb, fp.get_input_embeddings().weight.half().float())  # fp16 storage, float table
    # bits/weight counts the head's codes and fp16 scales (symmetric: no zeros): 8 + 16/32
    head_bpw = meta["layers"]["lm_head"]["bits_per_weight"]
    assert head_bpw == 8.5
    r0 = lowbit.quantize(src, method="gptq", bits=4, group_size=32, source=str(tiny_text), nsamples=4, seqlen=32,
                         progress=False)
    assert "lm_head" not in r0.meta["layers"] and r.report["bits_per_weight"] > r0.report["bits_per_weight"]


def test_head_bits_cli_and_bad_value(tiny_models, tmp_path, capsys):
    src = str(tiny_models["llama"])
    assert main(["quantize", src, "--method", "rtn", "--bits", "4", "--group-size", "32", "--head-bits", "4",
                 "--out", str(tmp_path / "h4"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "h4" / "lowbit.json").read_text())
    assert meta["layers"]["lm_head"]["bits"] == 4 and meta["layers"]["lm_head"]["sym"]
    # symmetric g32 is GGUF's Q4_0: the packed head exports losslessly as output.weight
    assert main(["export", str(tmp_path / "h4"), "--format", "gguf", "--out", str(tmp_path / "h4.gguf")]) == 0
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "h4.gguf")).tensors}
    assert types["output.weight"] == "Q4_0" and types["token_embd.weight"] in ("F16", "F32")
    with pytest.raises(LowbitError, match="--head-bits 1"):
        lowbit.quantize(src, method="rtn", head_bits=1)
