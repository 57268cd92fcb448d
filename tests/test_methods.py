"""The method registry (lowbit.methods), the per-method configs (lowbit.config) and what is generated from them:
the ``lowbit quantize`` flags, ``lowbit.json``'s config, ``lowbit info`` and the report's rebuild command."""
from __future__ import annotations

import dataclasses
import pkgutil
import shlex

import pytest
import torch

import lowbit.methods as methods
from lowbit.calib.runner import quantize_blocks
from lowbit.cli import build_parser, main, quantize_configs
from lowbit.config import CalibConfig, GridConfig, QuantConfig, applicable
from lowbit.errors import LowbitError
from lowbit.models.arch import blocks_of, linears_of, resolve_spec
from lowbit.models.sources import load_model
from lowbit.options import default_of, described
from lowbit.report.reproduce import quantize_command, saved_settings, settings_of
from lowbit.solvers import rtn


def test_every_method_file_registers_its_method():
    files = sorted(m.name for m in pkgutil.iter_modules(methods.__path__) if m.name != "base" and not m.name.startswith("_"))
    assert sorted(methods.REGISTRY) == files
    for name, spec in methods.REGISTRY.items():
        assert spec.name == name and spec.title and (spec.solve or spec.run)
        assert methods.get(name) is spec
    with pytest.raises(LowbitError, match="unknown method 'magic' .*rtn, gptq, foem"):
        methods.get("magic")


def test_flat_settings_go_to_the_grid_or_the_method():
    c = QuantConfig(method="foem", bits=3, beta=0.2)
    assert (c.grid.bits, c.options.beta, c.bits, c.beta, c.pullback) == (3, 0.2, 3, 0.2, "next")
    assert c.method == "foem" and c.method.value == "foem"
    assert QuantConfig(method="gptq").pullback == "next"  # another method's setting reads as its default
    assert QuantConfig(method="squeeze").ft_lr == 5e-3 and QuantConfig(method="quip").ft_lr == 1e-3
    assert QuantConfig(method="squeeze", ft_lr=None).ft_lr == 5e-3  # None: the default
    assert QuantConfig(method="gptq", beta=0.1).to_json() == QuantConfig().to_json()  # another method's default: fine
    for kw, msg in ((dict(beta=0.2), "--beta applies only to --method foem"),
                    (dict(rht=False), "--no-rht applies only to --method quip"),
                    (dict(finetune=True), "--finetune applies only to --method quip or squeeze"),
                    (dict(nonsense=1), "unknown setting 'nonsense'")):
        with pytest.raises(LowbitError, match=msg):
            QuantConfig(method="gptq", **kw)
    assert dataclasses.replace(c, bits=2).bits == 2 and dataclasses.replace(c, bits=2).beta == 0.2
    assert c.replace(method="gptq", options=None).method == "gptq"
    assert hash(c) == hash(QuantConfig(method="foem", bits=3, beta=0.2)) and c != QuantConfig(method="foem", bits=3)


def test_saved_config_holds_only_what_applies():
    grid = {f.name for f in dataclasses.fields(GridConfig)} - {"gguf_type", "rotate", "embedding_type", "target_bpw",
                                                           "bpw_candidates"}  # absent unless used
    assert set(QuantConfig(method="rtn").to_json()) == {"method"} | grid
    assert set(QuantConfig(method="foem").to_json()) == {"method", "beta", "pullback"} | grid
    assert QuantConfig(method="gptq", gguf_type="q4_k").to_json()["gguf_type"] == "Q4_K"
    old = {**QuantConfig(method="gptq").to_json(), "beta": 0.1, "codebook": "e8p", "rht": True, "ft_lr": 1e-3,
           "method": "rtn", "gguf_type": None, "bits": 3}  # an old lowbit.json listed every method's settings
    assert applicable(old) == {k: v for k, v in old.items() if k in grid | {"method"}}
    assert QuantConfig.from_json(old) == QuantConfig(method="rtn", bits=3)


def _parse(*argv):
    a = build_parser().parse_args(["quantize", "MODEL", *argv])
    return quantize_configs(a)


def test_every_existing_flag_spelling_keeps_its_meaning():
    q, c, _ = _parse("--no-static-groups", "--no-act-order", "--no-mse", "--no-true-sequential", "--fp-targets",
                     "--calib", "t.txt", "--calib-dtype", "float32", "--sym", "--damp", "0.5", "--block-size", "64")
    assert (q.static_groups, q.act_order, q.mse, q.sym, q.damp, q.block_size) == (False, False, False, True, 0.5, 64)
    assert (c.true_sequential, c.fp_targets, c.source, c.dtype) == (False, True, "t.txt", "float32")
    q, _, _ = _parse("--method", "squeeze", "--one-shot", "--binary-residual", "--finetune", "--ft-steps", "3")
    assert (q.squeeze_staged, q.binary_residual, q.finetune, q.ft_steps, q.ft_lr) == (False, True, True, 3, 5e-3)
    q, _, _ = _parse("--method", "quip", "--bits", "2", "--no-rht", "--no-scale-search", "--codebook", "scalar")
    assert (q.rht, q.scale_search, q.codebook) == (False, False, "scalar")
    q, _, qat = _parse("--method", "dlqat", "--steps", "7", "--distill", "--seed", "3", "--batch-size", "2", "--resume")
    assert (qat.steps, qat.distill, qat.seed, qat.batch_size, qat.resume) == (7, True, 3, 2, True)
    assert _parse("--method", "gptq", "--beta", "0.1")[0] == QuantConfig()  # a flag at its default: no error
    with pytest.raises(LowbitError, match="--beta applies only to --method foem"):
        _parse("--beta", "0.3")
    with pytest.raises(LowbitError, match="--steps applies only to --method dlqat"):
        _parse("--steps", "3")


def test_help_groups_flags_by_method_with_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    text = capsys.readouterr().out
    for head in ["grid (every method):", "calibration:"] + [f"--method {n}:" for n, m in methods.REGISTRY.items()
                                                            if described(m.options) or m.run_options]:
        assert head in text, head
    assert "{rtn,gptq,foem,gwq,squeeze,quip,dlqat" in text and "{grad,hessian,magnitude}" in text
    assert "{e8p,scalar}" in text and "code width in bits (default 4)" in text
    assert "(default 0.005 for squeeze, 0.001 for quip)" in " ".join(text.split())


def _other(f, default):
    """A valid value other than ``default`` for the option field ``f`` (None when there is no obvious one)."""
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if default is None and f.type in ("str | None", str):
        return "train.txt"
    return None


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_rebuild_command_gives_back_every_option_of_every_method(name):
    """Every option of the method (and DL-QAT's training settings) at a non-default value: the report's command,
    parsed by lowbit's own parser, rebuilds exactly the saved settings."""
    spec = methods.get(name)
    opts = {f.name: v for f in described(spec.options) if (v := _other(f, default_of(f))) is not None}
    grid = dict(bits=2 if name == "quip" else 3, group_size=64, sym=True, damp=0.02, head_bits=8)
    quant = QuantConfig(method=name, **grid, **opts)
    calibrated = spec.needs & {"calibration", "train_text"}
    calib = CalibConfig(source="my.txt", nsamples=16, seqlen=128, seed=3, batch_size=2, true_sequential=False)
    run = None
    if spec.run_options is not None:
        kw = {f.name: v for f in described(spec.run_options) if (v := _other(f, default_of(f))) is not None}
        run = spec.run_options(**kw, seed=3, batch_size=2)
    meta = {"method": name, "config": quant.to_json(), "source": {"kind": "folder", "path": "/m/fp"},
            "calibration": {**calib.to_json(), "fingerprint": "0"} if calibrated else None,
            **({spec.run_key: run.to_json()} if run is not None else {})}
    cmd, missing = quantize_command(meta, "out/x")
    assert missing == [], cmd
    argv = shlex.split(cmd)[2:-2]
    assert settings_of(argv, bool(calibrated)) == saved_settings(meta), cmd
    assert QuantConfig.from_json(settings_of(argv, bool(calibrated))["config"]) == quant


def test_prepare_block_runs_on_the_float_block_before_it_is_read(tiny_models, tiny_text):
    """The runner's ``prepare_block`` hook transforms each float block before the solver sees its weights."""
    model = load_model(str(tiny_models["llama"]))[0]
    spec = resolve_spec(model)
    originals = {i: {n: l.weight.detach().clone() for n, l in linears_of(b).items()}
                 for i, b in enumerate(blocks_of(model, spec))}
    seen, got = [], {}

    def prepare(block, inputs, calls, index):
        seen.append((index, len(inputs), tuple(inputs[0].shape), len(calls)))
        for lin in linears_of(block).values():
            lin.weight.data.mul_(2.0)

    def solve(W, H, name):
        got[name] = W.clone()
        return rtn.solve(W, H, QuantConfig(method="rtn", bits=8, group_size=32))

    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_blocks(model, spec, windows, solve, batch_size=2, progress=False, prepare_block=prepare)
    n_blocks = len(originals)
    assert [s[0] for s in seen] == list(range(n_blocks))
    assert all(s[1] == 2 and s[2][:2] == (2, 16) and s[3] == 2 for s in seen)
    for i, lins in originals.items():
        for n, W in lins.items():
            torch.testing.assert_close(got[f"{spec.blocks}.{i}.{n}"], 2.0 * W.float())


def test_info_and_lowbit_json_show_only_the_methods_settings(tiny_models, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["llama"]), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--out", str(out), "--quiet"]) == 0
    import json

    cfg = json.loads((out / "lowbit.json").read_text())["config"]
    assert cfg == QuantConfig(method="rtn", bits=3, group_size=32).to_json() and "beta" not in cfg
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("config"))
    assert "bits=3" in line and "group_size=32" in line
    assert not any(k in line for k in ("beta", "codebook", "rht", "saliency", "binary_frac"))
