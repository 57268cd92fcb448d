"""``--target-bpw B`` (lowbit.gguf.budget): the knapsack is optimal (brute force), sizes are the GGUF file's own
count (read back with the gguf package), more budget never means more error, layers that matter more get more
bits, and bad targets are refused in one line."""
import itertools
import json
import math
import random
import subprocess

import pytest
import torch
from helpers import build_wide, llama_cpp_bin, run_cli

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.gguf import budget
from lowbit.gguf.budget import DEFAULT_CANDIDATES, choose, errors, options_of, tensor_bits


def brute_force(bits, losses, capacity):
    best = math.inf
    for pick in itertools.product(*[range(len(b)) for b in bits]):
        if sum(b[k] for b, k in zip(bits, pick)) <= capacity:
            best = min(best, sum(e[k] for e, k in zip(losses, pick)))
    return best


def total(bits, losses, pick):
    return sum(b[k] for b, k in zip(bits, pick)), sum(e[k] for e, k in zip(losses, pick))


def test_knapsack_beats_greedy_by_ratio_on_a_hand_checked_case():
    # A: 10 bits save 10; B: 6 bits save 7 (the better ratio).  With 10 bits, the ratio greedy takes B and then
    # cannot afford A (loss 10); the optimum is A alone (loss 7).
    bits, losses = [[0, 10], [0, 6]], [[10.0, 0.0], [7.0, 0.0]]
    assert choose(bits, losses, 10) == [1, 0]
    assert choose(bits, losses, 16) == [1, 1] and choose(bits, losses, 5) == [0, 0]
    # an option above another's bits with more error is never chosen; equal bits: the smaller error
    assert choose([[4, 8, 6, 6]], [[3.0, 5.0, 1.0, 2.0]], 100) == [2]
    with pytest.raises(ValueError):
        choose(bits, [[1.0, 0.0], [1.0, 0.0]], -1)


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 6)
    bits = [[rng.randint(1, 12) * rng.choice((2, 4)) for _ in range(rng.randint(1, 4))] for _ in range(L)]
    losses = [[rng.choice((rng.random() * 10, float(rng.randint(0, 5)))) for _ in b] for b in bits]
    low, high = sum(min(b) for b in bits), sum(max(b) for b in bits)
    prev = math.inf
    for capacity in range(low, high + 2):
        pick = choose(bits, losses, capacity)
        used, loss = total(bits, losses, pick)
        assert used <= capacity
        assert loss == pytest.approx(brute_force(bits, losses, capacity), abs=1e-9)
        assert loss <= prev + 1e-12  # more budget never gives more error
        prev = loss


def test_coarse_table_still_fits_and_is_near_optimal():
    rng = random.Random(7)
    bits = [[rng.randint(50, 400) for _ in range(4)] for _ in range(6)]
    losses = [[rng.random() * 100 for _ in b] for b in bits]
    unit = -(-sum(max(b) - min(b) for b in bits) // (60 // 6 - 1))  # at least the unit a 60-entry table uses
    for capacity in range(sum(map(min, bits)), sum(map(max, bits)), 97):
        pick = choose(bits, losses, capacity, max_table=60)  # forces a coarse unit (rounded-up sizes)
        used, loss = total(bits, losses, pick)
        assert used <= capacity
        # each size rounds up by less than one unit: as good as the optimum with L units less room
        assert loss <= brute_force(bits, losses, capacity - 6 * unit) + 1e-9
        assert loss >= brute_force(bits, losses, capacity) - 1e-9


def test_sizes_are_the_gguf_counts_and_fallbacks_are_llama_cpps():
    import gguf

    for t in ("Q2_K", "Q4_K", "Q6_K", "Q4_0", "Q8_0", "IQ4_NL", "F16"):
        shape = (3, 512)
        qt = gguf.GGMLQuantizationType[t]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        assert tensor_bits(t, shape) == 3 * 512 // block * size * 8
    assert tensor_bits("F32", (7,)) == 7 * 32
    # SmolLM2's 576-wide rows: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (llama.cpp's fallback)
    assert options_of((64, 576), DEFAULT_CANDIDATES) == ["Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert options_of((64, 1536), DEFAULT_CANDIDATES) == list(DEFAULT_CANDIDATES)
    assert options_of((64, 48), ("Q4_K", "Q8_0")) == []  # 48 is no multiple of 32: F16 only, not a candidate


def test_layers_that_matter_more_get_more_bits():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 256, generator=gen) * 0.05
    X = torch.randn(512, 256, generator=gen) * (1 + 3 * torch.rand(256, generator=gen))
    H = 2 / X.shape[0] * X.T @ X
    types = ["Q2_K", "Q3_K", "Q4_K", "Q6_K"]
    weights = [1.0, 8.0, 64.0, 512.0]  # the same weight, its inputs larger and larger
    losses = [errors(W, c * H, types) for c in weights]
    assert all(a > b for a, b in zip(losses[0], losses[0][1:]))  # more bits, less error
    for c, e in zip(weights, losses):  # H's scale scales the error and not the fit (importance is relative)
        assert e == pytest.approx([c * x for x in losses[0]], rel=1e-5)
    bits = [[tensor_bits(t, W.shape) for t in types]] * 4
    chosen_bits = []
    for capacity in range(sum(b[0] for b in bits), sum(b[-1] for b in bits), 2048):
        pick = choose(bits, losses, capacity)
        got = [bits[i][k] for i, k in enumerate(pick)]
        assert got == sorted(got)  # a layer that matters more never gets fewer bits
        chosen_bits.append(got)
    assert any(g[0] < g[-1] for g in chosen_bits)


def test_settings_are_checked():
    cfg = QuantConfig(method="gptq", target_bpw=3.5, bpw_candidates="q3_k, Q4_K q6_k")
    assert cfg.bpw_candidates == "Q3_K,Q4_K,Q6_K" and cfg.to_json()["target_bpw"] == 3.5
    assert "target_bpw" not in QuantConfig(method="gptq").to_json()  # absent unless used
    for kw, needle in [(dict(target_bpw=0), "--target-bpw 0"), (dict(target_bpw=float("nan")), "--target-bpw"),
                       (dict(target_bpw=3.5, gguf_type="Q4_K"), "drop --gguf-type"),
                       (dict(bpw_candidates="Q4_K"), "only with --target-bpw"),
                       (dict(target_bpw=3.5, bpw_candidates="Q4_K,Q9_K"), "--bpw-candidates"),
                       (dict(method="squeeze", target_bpw=3.5), "--target-bpw applies to")]:
        with pytest.raises(LowbitError, match=needle):
            QuantConfig(**{"method": "gptq", **kw})


def _one_line(code, err, needle):
    lines = [x for x in err.strip().splitlines() if not x.startswith(("Loading", "Writing"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error: ") and needle in lines[0], err


@pytest.mark.parametrize("args, needle", [
    (["--target-bpw", "nan"], "--target-bpw"),
    (["--target-bpw", "-1"], "--target-bpw -1.0 must be a positive"),
    (["--target-bpw", "4", "--gguf-type", "Q4_K"], "drop --gguf-type Q4_K"),
    (["--target-bpw", "4", "--bpw-candidates", "Q4_K,Q4_K_M"], "--bpw-candidates"),
    (["--target-bpw", "2.0"], "below the smallest size the candidates reach on this model"),
])
def test_bad_targets_are_refused_in_one_line(capsys, tiny_models, tiny_text, tmp_path, args, needle):
    out = tmp_path / "o"
    try:
        code, err = run_cli(capsys, "quantize", str(tiny_models["llama"]), "--method", "gptq", "--calib",
                            str(tiny_text), "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--quiet", *args)
    except SystemExit as e:  # argparse's own refusal (a value that is no finite number)
        code, err = e.code, capsys.readouterr().err
    _one_line(code, err, needle)
    assert not out.exists()


def test_the_floor_is_named_and_reachable(tiny_models):
    """The refusal names the smallest bpw; asking exactly that is accepted (every layer at its cheapest)."""
    from lowbit.models.arch import blocks_of, resolve_spec
    from lowbit.models.sources import load_model

    model, _, _ = load_model(str(tiny_models["llama"]))
    spec = resolve_spec(model)
    n = len(blocks_of(model, spec))
    with pytest.raises(LowbitError, match=r"reach on this model, (\d+\.\d+) bits/weight") as e:
        budget.plan(model, spec, QuantConfig(method="rtn", target_bpw=1.0), n)
    floor = float(str(e.value).split("model, ")[1].split(" ")[0])
    p = budget.plan(model, spec, QuantConfig(method="rtn", target_bpw=floor), n)
    low = p.record["reachable_bpw"][0]
    assert p.record["predicted_bpw"] == pytest.approx(low) and low <= floor < low + 1e-4
    assert set(p.types.values()) == {"Q4_0"}  # 64/96-wide rows: every K-quant falls back, Q2_K/Q3_K to Q4_0


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_wide(tmp_path_factory.mktemp("budget") / "m", "llama")


@pytest.mark.e2e
def test_target_bpw_end_to_end(capsys, wide, tmp_path):
    """GPTQ with --target-bpw through the CLI, exported as GGUF: the file's own bits per weight (gguf package) are
    at most B and within one layer's step of it; lowbit.json and ``lowbit info --layers`` show the chosen types;
    the measured table gives a total error that never grows with B."""
    import gguf

    B = 4.0
    out = tmp_path / "q"
    code, err = run_cli(capsys, "quantize", str(wide), "--method", "gptq", "--target-bpw", str(B), "--calib",
                        str(wide / "calib.txt"), "--nsamples", "8", "--seqlen", "128", "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "lowbit.json").read_text())
    rec = meta["gguf_budget"]
    assert meta["config"]["target_bpw"] == B and rec["achieved_bpw"] == pytest.approx(rec["predicted_bpw"])
    types = {n: l["gguf_type"] for n, l in meta["layers"].items()}
    assert len(set(types.values())) >= 2 and set(types.values()) <= set(DEFAULT_CANDIDATES)
    assert rec["loss"] < rec["predicted_loss"]  # GPTQ below RTN's estimate
    assert run_cli(capsys, "export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))[0] == 0
    tensors = gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
    file_bpw = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    assert file_bpw == pytest.approx(rec["achieved_bpw"], rel=1e-12)
    steps = [tensor_bits(b, meta["layers"][n]["shape"]) - tensor_bits(a, meta["layers"][n]["shape"])
             for n, m in rec["measured"].items() for a, b in zip(m, list(m)[1:])]
    assert B - max(steps) / rec["weights"] < file_bpw <= B
    by_file = {t.name: t.tensor_type.name for t in tensors}
    assert by_file["blk.1.ffn_down.weight"] == types["model.layers.1.mlp.down_proj"]
    exe = llama_cpp_bin("llama-perplexity")
    if exe is not None:  # llama.cpp runs the mixed-type file
        r = subprocess.run([exe, "-m", str(tmp_path / "m.gguf"), "-f", str(wide / "calib.txt"), "-c", "128",
                            "--chunks", "2", "-t", "1"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Final estimate: PPL" in r.stdout + r.stderr, r.stderr[-2000:]
    # the measured table: a larger B never gives a larger total error
    names = list(rec["measured"])
    bits = [[tensor_bits(t, meta["layers"][n]["shape"]) for t in rec["measured"][n]] for n in names]
    losses = [list(rec["measured"][n].values()) for n in names]
    prev = math.inf
    for b in (3.7, 3.8, 4.0, 4.5, 5.0, 6.0, 8.0):
        pick = choose(bits, losses, math.floor(b * rec["weights"]) - rec["other_bits"])
        loss = total(bits, losses, pick)[1]
        assert loss <= prev
        prev = loss


@pytest.mark.e2e
def test_info_shows_the_chosen_types(capsys, wide, tmp_path):
    """RTN (data-free plan, ‖ΔW‖²) at a lower target: ``lowbit info --layers`` lists each layer's chosen type and the
    one-line summary."""
    import lowbit

    out = tmp_path / "r"
    lowbit.quantize(str(wide), method="rtn", target_bpw=3.8, out=out, progress=False)
    capsys.readouterr()
    from lowbit.cli import main

    assert main(["info", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    meta = json.loads((out / "lowbit.json").read_text())
    assert "--target-bpw 3.8:" in text and meta["gguf_budget"]["predicted_bpw"] <= 3.8
    for n, l in meta["layers"].items():
        line = next(x for x in text.splitlines() if x.strip().startswith(n + " "))
        assert f" {l['gguf_type']} " in line
