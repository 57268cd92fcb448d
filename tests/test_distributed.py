"""``torchrun --nproc_per_node=2 -m lowbit quantize`` (gloo, CPU) gives the single-process result."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit

ARGS = ["--bits", "3", "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--grad-samples", "4", "--quiet"]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("method", ["gwq"])  # Hessians and gradients both reduced
def test_two_gloo_processes_equal_one(method, tiny_models, tiny_text, tmp_path):
    model = str(tiny_models["llama"])
    common = ["quantize", model, "--method", method, "--calib", str(tiny_text), *ARGS]
    _run([sys.executable, "-m", "lowbit", *common, "--out", "one", "--json", "one.json"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowbit",
          *common, "--out", "two", "--json", "two.json"], tmp_path)
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    m1, tok, meta1 = lowbit.load(tmp_path / "one", device="cpu")
    m2, _, meta2 = lowbit.load(tmp_path / "two", device="cpu")
    assert meta1["calibration"]["fingerprint"] == meta2["calibration"]["fingerprint"]
    same = total = 0
    for (n1, t1), (n2, t2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2
        same += int((t1 == t2).sum())
        total += t1.numel()
    assert same / total > 0.999  # sums reduced in another order may flip a rare code
    ev = [lowbit.evaluate_ppl(m, tok, text=str(tiny_text), seqlen=64, max_tokens=2048)["ppl"] for m in (m1, m2)]
    assert ev[0] == pytest.approx(ev[1], rel=1e-4)
    torch.testing.assert_close(torch.tensor(meta1["bits_per_weight"]), torch.tensor(meta2["bits_per_weight"]))
