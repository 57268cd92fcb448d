"""Resume (issue 7, part 3): a calibration run killed at any point continues with ``--resume`` from its per-block
checkpoints in ``OUT.work/blocks/`` and writes files byte-identical to an uninterrupted run; a work area written
with other settings refuses to resume with one clean line."""
import os
import subprocess
import sys

import pytest

import lowbit
from lowbit import api
from lowbit.calib import resume as resume_mod
from lowbit.cli import main
from lowbit.errors import LowbitError

from helpers import artifact_files

pytestmark = pytest.mark.e2e  # kill and resume: whole runs, one through a real SIGKILL

CALIB = dict(nsamples=8, seqlen=64, seed=0, progress=False)
METHODS = {  # method settings; batch_size=3 takes the runner's multi-micro-batch path
    "gptq": dict(method="gptq", bits=3, group_size=32),
    "gptq-microbatches": dict(method="gptq", bits=4, group_size=32, batch_size=3),
    "squeeze": dict(method="squeeze", group_size=32),
    "gwq": dict(method="gwq", bits=3, group_size=32, grad_samples=2),
    "quip-finetune": dict(method="quip", bits=2, finetune=True, ft_steps=3),
}


ORIG_SOLVE = api._solve


class Killed(BaseException):
    """Stands in for SIGKILL inside the process (BaseException: nothing may catch and tidy up after it)."""


def files(d):
    return artifact_files(d)  # lowbit.json without the run's seconds / peak RSS / machine


def assert_identical(a, b):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name


def kill_after(monkeypatch, n_solves):
    """Make the ``n_solves + 1``-th layer solve 'kill' the run; returns the list counting solves."""
    calls, orig = [], ORIG_SOLVE

    def solve(*a, **k):
        if len(calls) >= n_solves:
            raise Killed
        calls.append(a[3] if len(a) > 3 else k.get("name"))
        return orig(*a, **k)

    monkeypatch.setattr(api, "_solve", solve)
    return calls


@pytest.fixture(scope="module")
def reference(tiny_models, tiny_text, tmp_path_factory):
    """Uninterrupted runs, one per method: ``{case: out folder}``."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for case, kw in METHODS.items():
        out[case] = root / case
        lowbit.quantize(str(tiny_models["llama"]), out=out[case], source=str(tiny_text), **kw, **CALIB)
        assert not (root / f"{case}.work").exists()  # the work area goes once the output is written
    return out


@pytest.mark.parametrize("case", list(METHODS))
def test_killed_in_block_1_resumes_to_identical_files(case, reference, tiny_models, tiny_text, tmp_path, monkeypatch):
    kw = dict(source=str(tiny_text), **METHODS[case], **CALIB)
    out = tmp_path / "q"
    kill_after(monkeypatch, 9)  # block 0 has 7 linears: killed while solving block 1
    with pytest.raises(Killed):
        lowbit.quantize(str(tiny_models["llama"]), out=out, **kw)
    assert not out.exists()
    done = sorted(p.name for p in (tmp_path / "q.work" / "blocks").iterdir())
    assert done == ["block_0000.json", "block_0000.safetensors", "inputs_0000.safetensors"]
    calls = kill_after(monkeypatch, 10**6)
    lowbit.quantize(str(tiny_models["llama"]), out=out, resume=True, **kw)
    assert len(calls) == 7 and all(".layers.1." in n for n in calls)  # block 0 was restored, not recomputed
    assert_identical(reference[case], out)
    assert not (tmp_path / "q.work").exists()


def test_killed_while_committing_a_block(reference, tiny_models, tiny_text, tmp_path, monkeypatch):
    """A kill between a block's tensors and its commit record leaves the block unfinished: it is redone."""
    kw = dict(source=str(tiny_text), **METHODS["gptq"], **CALIB)
    orig = resume_mod._write_atomic

    def write(path, fn):
        if path.name == "block_0001.json":
            fn(path.with_name(f".{path.name}.tmp"))  # half-way: the temporary file exists, the rename never happens
            raise Killed
        orig(path, fn)

    monkeypatch.setattr(resume_mod, "_write_atomic", write)
    with pytest.raises(Killed):
        lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", **kw)
    monkeypatch.setattr(resume_mod, "_write_atomic", orig)
    calls = kill_after(monkeypatch, 10**6)
    lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", resume=True, **kw)
    assert len(calls) == 7
    assert_identical(reference["gptq"], tmp_path / "q")


DRIVER = """
import os, signal, sys
import lowbit.api as api
n, calls, orig = int(sys.argv[1]), [], api._solve
def solve(*a, **k):
    if len(calls) >= n:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return orig(*a, **k)
api._solve = solve
from lowbit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_real_sigkill_then_cli_resume(tiny_models, tiny_text, tmp_path, capsys):
    """A real process killed with SIGKILL in block 2 of 3 (gemma3); ``lowbit quantize --resume`` finishes it."""
    args = [str(tiny_models["gemma3"]), "--bits", "4", "--group-size", "32", "--calib", str(tiny_text),
            "--nsamples", "8", "--seqlen", "64", "--quiet"]
    assert main(["quantize", *args, "--out", str(tmp_path / "a")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", DRIVER, "16", "quantize", *args, "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == -9, r.stderr
    assert not (tmp_path / "b").exists()
    assert (tmp_path / "b.work" / "blocks" / "block_0001.json").is_file()
    assert main(["quantize", *args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert_identical(tmp_path / "a", tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("change", [["--bits", "3"], ["--seed", "1"], ["--nsamples", "6"], ["--no-mse"]])
def test_changed_settings_refuse_to_resume(change, tiny_models, tiny_text, tmp_path, capsys, monkeypatch):
    base = ["quantize", str(tiny_models["llama"]), "--bits", "4", "--group-size", "32", "--calib", str(tiny_text),
            "--nsamples", "8", "--seqlen", "64", "--quiet", "--out", str(tmp_path / "q")]
    kill_after(monkeypatch, 8)
    with pytest.raises(Killed):
        main(base)
    argv = base + change + ["--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error: --resume: the work folder"), err
    assert str(tmp_path / "q.work") in err[0] and "different settings" in err[0]
    assert (tmp_path / "q.work" / "blocks" / "block_0000.json").is_file()  # nothing was thrown away
    with pytest.raises(LowbitError, match="different settings"):
        lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", resume=True, bits=4, group_size=32,
                        source=str(tiny_text), **{**CALIB, "seed": 7})


def test_without_resume_a_stale_work_area_is_cleared(reference, tiny_models, tiny_text, tmp_path, monkeypatch):
    kw = dict(source=str(tiny_text), **METHODS["gptq"], **CALIB)
    stale = tmp_path / "q.work" / "blocks"
    stale.mkdir(parents=True)
    (stale / "block_0000.json").write_text('{"fingerprint": "someone else"}')
    calls = kill_after(monkeypatch, 10**6)
    lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", **kw)
    assert len(calls) == 14
    assert_identical(reference["gptq"], tmp_path / "q")
    assert not (tmp_path / "q.work").exists()


def test_resume_with_nothing_to_resume_runs_everything(reference, tiny_models, tiny_text, tmp_path):
    lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", resume=True, source=str(tiny_text),
                    **METHODS["gptq"], **CALIB)
    assert_identical(reference["gptq"], tmp_path / "q")


def test_corrupt_checkpoint_is_a_clean_error(tiny_models, tiny_text, tmp_path, monkeypatch):
    kw = dict(source=str(tiny_text), **METHODS["gptq"], **CALIB)
    kill_after(monkeypatch, 9)
    with pytest.raises(Killed):
        lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", **kw)
    f = tmp_path / "q.work" / "blocks" / "inputs_0000.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    kill_after(monkeypatch, 10**6)
    with pytest.raises(LowbitError, match="inputs_0000.safetensors' is missing or corrupt"):
        lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "q", resume=True, **kw)


def test_resume_flag_errors(tiny_models, tiny_text, capsys, tmp_path):
    m = str(tiny_models["llama"])
    for argv, needle in ((["--calib", str(tiny_text), "--resume"], "--resume needs --out"),
                         (["--method", "rtn", "--resume", "--out", str(tmp_path / "r")], "rtn is data-free")):
        assert main(["quantize", m, "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
