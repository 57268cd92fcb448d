"""benchmarks/llama_cpp_gguf.py's helpers: parsing llama-perplexity's log and llama-bench's JSON, the tensor types
and sizes of a GGUF file, the --target-bpw that fits a file size, and lowbit's name of a llama.cpp preset."""
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("llama_cpp_gguf")

KLD_LOG = """\
llama_perplexity: 16 chunks
Mean PPL(Q)                   :  31.478099 ±   0.612345
Mean PPL(base)                :  29.607000 ±   0.570000
Mean PPL(Q)/PPL(base)         :   1.063197 ±   0.004000
Mean    KLD:   0.160261 ±   0.002100
Maximum KLD:   5.123456
Same top p: 75.123 ± 0.482 %
"""


def test_parse_perplexity():
    assert bench.parse_perplexity(KLD_LOG) == {"ppl": 31.478099, "kld": 0.160261, "same_top_pct": 75.123}
    plain = "[1]30.1,[2]33.2,\nFinal estimate: PPL = 33.4589 +/- 0.61234\n"
    assert bench.parse_perplexity(plain) == {"ppl": 33.4589, "kld": None, "same_top_pct": None}


def test_parse_bench():
    out = """[
  {"model_type": "llama ?B Q4_0", "n_prompt": 128, "n_gen": 0, "avg_ts": 812.5, "stddev_ts": 3.1},
  {"model_type": "llama ?B Q4_0", "n_prompt": 0, "n_gen": 64, "avg_ts": 131.25, "stddev_ts": 0.4},
  {"model_type": "llama ?B Q4_0", "n_prompt": 16, "n_gen": 16, "avg_ts": 99.0, "stddev_ts": 0.4}
]
"""
    assert bench.parse_bench(out) == {"pp_tps": 812.5, "tg_tps": 131.25}
    assert bench.parse_bench('[{"n_prompt": 0, "n_gen": 64, "avg_ts": 7}]') == {"pp_tps": None, "tg_tps": 7.0}


def test_type_diff():
    ours = {"token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_1", "blk.0.attn_q.weight": "Q4_0"}
    theirs = {"token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_0", "output.weight": "Q6_K",
              "blk.0.attn_q.weight": "Q4_0"}
    assert bench.type_diff(ours, theirs) == ["blk.0.ffn_down.weight: Q4_1 vs Q4_0", "output.weight: - vs Q6_K"]
    assert bench.type_diff(theirs, theirs) == []


def test_budget_bpw_fits_the_file():
    assert bench.budget_bpw(1000, 100, 1000) == 7.2
    assert bench.budget_bpw(1000, 0, 3000) == 2.6666  # rounded down, never up
    for limit, over, n in [(91_893_056, 2_000_000, 134_515_008), (10**6 + 7, 12_345, 999_983)]:
        b = bench.budget_bpw(limit, over, n)
        assert b * n / 8 + over <= limit < (b + 1e-4) * n / 8 + over


def test_layout_and_tensor_types(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", np.zeros((2, 34), dtype=np.uint8), raw_shape=(2, 34), raw_dtype=q8)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "m.gguf"
    assert bench.tensor_types(path) == {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32"}
    assert bench.layout(path) == (2 * 32 + 32, 2 * 34 + 32 * 4)


def test_lowbit_name_is_the_same_preset():
    assert bench.lowbit_name("Q4_0", pure=False) == "MOSTLY_Q4_0"
    assert bench.lowbit_name("Q4_K_M", pure=False) == "Q4_K_M"
    assert bench.lowbit_name("IQ2_XS", pure=False) == "MOSTLY_IQ2_XS"
    assert bench.lowbit_name("q3_k_m", pure=False) == "Q3_K_M"
    assert bench.lowbit_name("Q4_0", pure=True) == "Q4_0"
    assert bench.lowbit_name("Q4_K_M", pure=True) == "Q4_K"


def test_refit_rounds_are_lowbits_defaults_on_the_rows_own_grid():
    """QuIP# takes only the vector-grid types, so its default is asked for on the row's type (a fixed probe type
    such as Q4_0 was refused by lowbit and stopped the benchmark)."""
    assert bench.refit_rounds("quip", None, gguf_type="MOSTLY_IQ2_XS") == 1
    assert bench.refit_rounds("gptq", None, target_bpw=5.1) == 1
    assert bench.refit_rounds("rtn", None, gguf_type="Q4_0") == 0
    assert bench.refit_rounds("quip", 2, gguf_type="MOSTLY_IQ2_XS") == 2
