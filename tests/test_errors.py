"""Bad input: every case ends with one clean line naming the file or argument and exit status 2,
never a traceback and never a half-written output."""
import json
import shutil

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError

from helpers import run_cli

CALIB = dict(nsamples=4, seqlen=64, seed=0, progress=False)


@pytest.fixture(scope="module")
def ckpt(tiny_models, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "q"
    lowbit.quantize(str(tiny_models["llama"]), bits=4, group_size=32, source=str(tiny_text), out=out, **CALIB)
    return out


def assert_clean(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if not l.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model(capsys, tmp_path):
    assert_clean(*run_cli(capsys, "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "nope", "not found")
    assert not (tmp_path / "o").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    assert_clean(*run_cli(capsys, "quantize", str(tmp_path / "m")), "config.json")


def test_non_gguf_file(capsys, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00" * 10)
    assert_clean(*run_cli(capsys, "quantize", str(f)), "model.bin", ".gguf")


def test_truncated_gguf(capsys, tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    assert_clean(*run_cli(capsys, "quantize", str(f)), "bad.gguf")


def test_unsupported_bits_and_group_size(capsys, tiny_models):
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--bits", "1"), "--bits 1")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--group-size", "0"), "--group-size 0")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--method", "magic"), "--method")


def test_calibration_text_too_short(capsys, tiny_models, tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("the king")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(t), "--seqlen", "64"),
                 "fewer than one window", "--seqlen 64")


def test_empty_calibration_text(capsys, tiny_models, tmp_path):
    t = tmp_path / "empty.txt"
    t.write_text("  \n")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(t)), "empty.txt", "empty")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--nsamples", "0"), "--nsamples")


def test_eval_text_shorter_than_window(capsys, ckpt, tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("the king and the queen")
    assert_clean(*run_cli(capsys, "eval", str(ckpt), "--text", str(t), "--seqlen", "64"), "fewer than one window")


def test_unknown_architecture(capsys, tmp_path):
    from transformers import GPT2Config

    # a config transformers knows but whose model has no decoder-block list lowbit can find
    cfg = tmp_path / "m"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    assert_clean(*run_cli(capsys, "quantize", str(cfg)), "config.json", "unknown architecture 'not-a-model'")
    from lowbit.models.arch import resolve_spec

    class NoBlocks(torch.nn.Module):
        config = GPT2Config()

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(LowbitError, match="unknown architecture 'gpt2'"):
        resolve_spec(NoBlocks())


def test_checkpoint_missing_meta(capsys, broken):
    (broken / "lowbit.json").unlink()
    assert_clean(*run_cli(capsys, "info", str(broken)), "lowbit.json is missing")


def test_checkpoint_wrong_version(capsys, broken):
    meta = json.loads((broken / "lowbit.json").read_text())
    meta["format_version"] = 99
    (broken / "lowbit.json").write_text(json.dumps(meta))
    assert_clean(*run_cli(capsys, "eval", str(broken)), "unknown format version 99")


def test_checkpoint_bad_json(capsys, broken):
    (broken / "lowbit.json").write_text("{not json")
    assert_clean(*run_cli(capsys, "info", str(broken)), "lowbit.json", "not valid JSON")


def test_checkpoint_truncated_weights(capsys, broken):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean(*run_cli(capsys, "eval", str(broken)), "model.safetensors", "truncated or corrupt")


def test_checkpoint_missing_weights(capsys, broken):
    (broken / "model.safetensors").unlink()
    assert_clean(*run_cli(capsys, "eval", str(broken)), "model.safetensors is missing")


def _rewrite(broken, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(broken / "model.safetensors"))
    edit(t)
    save_file(t, str(broken / "model.safetensors"))


def test_checkpoint_missing_tensor(capsys, broken):
    _rewrite(broken, lambda t: t.pop("model.layers.0.self_attn.q_proj.scales"))
    assert_clean(*run_cli(capsys, "eval", str(broken)), "model.layers.0.self_attn.q_proj", "scales")


def test_checkpoint_wrong_shape(capsys, broken):
    def edit(t):
        t["model.layers.1.mlp.down_proj.qweight"] = t["model.layers.1.mlp.down_proj.qweight"][:, :-1].contiguous()
    _rewrite(broken, edit)
    assert_clean(*run_cli(capsys, "eval", str(broken)), "down_proj", "qweight")


def test_checkpoint_missing_norm(capsys, broken):
    _rewrite(broken, lambda t: t.pop("model.norm.weight"))
    assert_clean(*run_cli(capsys, "eval", str(broken)), "missing tensor 'model.norm.weight'")


def test_refuses_to_overwrite_foreign_folder(capsys, tiny_models, tiny_text, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.txt").write_text("keep me")
    code, err = run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(tiny_text), "--nsamples", "4",
                        "--seqlen", "64", "--out", str(out), "--quiet")
    assert_clean(code, err, "precious", "refusing to overwrite")
    assert (out / "data.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary folder left behind


def test_overwrites_lowbit_checkpoint_atomically(ckpt, tiny_models, tiny_text, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(ckpt, out)
    lowbit.quantize(str(tiny_models["llama"]), bits=3, group_size=32, source=str(tiny_text), out=out, **CALIB)
    assert json.loads((out / "lowbit.json").read_text())["config"]["bits"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_unwritable_output(capsys, tiny_models, tiny_text, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    code, err = run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(tiny_text),
                        "--nsamples", "4", "--seqlen", "64", "--out", str(blocker / "q"), "--quiet")
    assert_clean(code, err, "--out", "cannot write")
