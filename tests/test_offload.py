"""Disk offload (issue 7, part 2): with ``--offload disk`` the blocks' float weights stay in the safetensors files
until the runner reaches them, the float weights of all blocks are never in memory together, and the output
files are byte-identical to a run without offload."""
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models import offload as offload_mod
from lowbit.models.arch import resolve_spec
from lowbit.models.sources import load_model
from lowbit.packed.qlinear import QuantLinear

from helpers import artifact_files

pytestmark = pytest.mark.e2e  # offload: blocks streamed from disk through whole runs

CALIB = dict(nsamples=8, seqlen=64, seed=0, progress=False)
METHODS = {
    "gptq": dict(method="gptq", bits=3, group_size=32),
    "gptq-microbatches": dict(method="gptq", bits=4, group_size=32, batch_size=3),
    "squeeze": dict(method="squeeze", group_size=32),
    "rtn": dict(method="rtn", bits=4, group_size=32),
}


def files(d):
    return artifact_files(d)  # lowbit.json without the run's seconds / peak RSS / machine


def assert_same_output(a, b):
    """Every file byte-identical; ``lowbit.json`` identical but for the recorded ``offload`` setting."""
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "lowbit.json":
            ma, mb = json.loads(fa[name]), json.loads(fb[name])
            if mb.get("calibration"):
                assert mb["calibration"].pop("offload") == "disk"
                assert ma["calibration"].pop("offload") == "none"
            assert ma == mb
        else:
            assert fa[name] == fb[name], name


def test_offloaded_model_loads_the_same_tensors(tiny_models):
    for family in ("llama", "opt"):
        ref, _, info = load_model(str(tiny_models[family]))
        model, _, info2, off = offload_mod.load_offloaded(str(tiny_models[family]), lambda m: resolve_spec(m).blocks)
        assert info == info2 and ref.config.to_json_string() == model.config.to_json_string()
        blocks = model.get_submodule(off.blocks_path)
        assert all(p.device.type == "meta" for p in blocks.parameters())
        assert all(p.device.type != "meta" for n, p in model.named_parameters() if not n.startswith(off.blocks_path))
        for i in range(len(blocks)):
            off.materialize(i)
        sr, sm = ref.state_dict(), model.state_dict()
        assert list(sr) == list(sm)
        assert all(sr[k].dtype == sm[k].dtype and torch.equal(sr[k], sm[k]) for k in sr)


@pytest.mark.parametrize("case", list(METHODS))
def test_offload_writes_identical_files(case, tiny_models, tiny_text, tmp_path):
    kw = dict(source=str(tiny_text), **METHODS[case], **CALIB)
    lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "a", **kw)
    res = lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / "b", offload="disk", **kw)
    assert all(p.device.type != "meta" for p in res.model.parameters())
    assert_same_output(tmp_path / "a", tmp_path / "b")


def test_never_all_blocks_in_float(tiny_models, tiny_text, tmp_path, monkeypatch):
    """At each ``materialize(i)``: blocks before i hold only packed linears, blocks after i are still on meta,
    and so are the token embedding and the head (released once block 0's inputs are captured)."""
    seen = []
    orig = offload_mod.DiskOffload.materialize

    def materialize(self, i):
        blocks = self.model.get_submodule(self.blocks_path)
        for j, blk in enumerate(blocks):
            float_linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in blk.modules()
                                     if isinstance(m, nn.Linear) and m.weight.device.type != "meta")
            if j < i:
                assert float_linear_bytes == 0 and any(isinstance(m, QuantLinear) for m in blk.modules())
            else:
                assert all(p.device.type == "meta" for p in blk.parameters()), (i, j)
        for emb in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
            assert emb.weight.device.type == "meta", i
        seen.append(i)
        orig(self, i)

    monkeypatch.setattr(offload_mod.DiskOffload, "materialize", materialize)
    lowbit.quantize(str(tiny_models["gemma3"]), out=tmp_path / "q", source=str(tiny_text), offload="disk",
                    **METHODS["gptq"], **CALIB)
    assert seen == [0, 1, 2]


def test_offload_resume_and_cli(tiny_models, tiny_text, tmp_path, monkeypatch):
    """A run with offload killed in block 1 resumes (restored blocks are loaded from disk first); the CLI flag."""
    from lowbit import api

    args = [str(tiny_models["llama"]), "--bits", "3", "--group-size", "32", "--calib", str(tiny_text),
            "--nsamples", "8", "--seqlen", "64", "--quiet"]
    assert main(["quantize", *args, "--out", str(tmp_path / "a")]) == 0
    calls, orig = [], api._solve

    class Killed(BaseException):
        pass

    def solve(*a, **k):
        if len(calls) >= 9:
            raise Killed
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(api, "_solve", solve)
    with pytest.raises(Killed):
        main(["quantize", *args, "--offload", "disk", "--out", str(tmp_path / "b")])
    monkeypatch.setattr(api, "_solve", orig)
    assert main(["quantize", *args, "--offload", "disk", "--resume", "--out", str(tmp_path / "b")]) == 0
    assert_same_output(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("settings, msg", [
    (dict(method="gwq", grad_samples=2), "--saliency grad"),
    (dict(method="dlqat"), "dlqat"),
    (dict(method="gptq", offload="ram"), "--offload 'ram'"),
])
def test_unsupported_combinations_fail_cleanly(settings, msg, tiny_models, tiny_text):
    kw = {**CALIB, **settings}
    kw.setdefault("offload", "disk")
    with pytest.raises(LowbitError, match=msg) as e:
        lowbit.quantize(str(tiny_models["llama"]), source=str(tiny_text), **kw)
    assert "\n" not in str(e.value)


def test_offload_needs_safetensors(tiny_models, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(LowbitError, match="no model.safetensors"):
        offload_mod.load_offloaded(str(folder), lambda m: resolve_spec(m).blocks)
