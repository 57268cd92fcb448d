"""``torchrun --nproc_per_node=2 -m lowbit quantize`` (gloo, CPU) writes the files of one process, bit for bit."""
import json
import os
import subprocess
import sys

import pytest

from helpers import artifact_files

pytestmark = pytest.mark.e2e  # torchrun, two processes

# 7 windows, 3 gradient windows: rank 0 gets one more than rank 1, so the ranks' rounds of window sums differ
ARGS = ["--bits", "3", "--group-size", "32", "--nsamples", "7", "--seqlen", "64", "--grad-samples", "3", "--quiet"]
CASES = {
    "gwq": ["--method", "gwq"],  # Hessians and gradients, both summed in window order
    # FIAS cross moments; batches of 2 on two ranks (4 + 3 windows) against one pass of 7 in one process
    "fias-microbatches": ["--method", "gptq", "--fp-targets"],
}


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _files(folder):
    out = artifact_files(folder)
    meta = json.loads(out["lowbit.json"])
    meta["calibration"].pop("batch_size")
    out["lowbit.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_equal_one(case, tiny_models, tiny_text, tmp_path):
    common = ["quantize", str(tiny_models["llama"]), "--calib", str(tiny_text), *ARGS, *CASES[case]]
    two_batch = ["--batch-size", "2"] if case.endswith("microbatches") else []
    _run([sys.executable, "-m", "lowbit", *common, "--out", "one", "--json", "one.json"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowbit",
          *common, *two_batch, "--out", "two", "--json", "two.json"], tmp_path)
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], name
