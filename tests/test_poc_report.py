"""The PoC report a new user gets on the first try (issue 19): own text files, ``--json`` outputs elsewhere,
no report flags.  Two folders quantized and evaluated, one benched and compared by KL divergence, the
float model evaluated on the same text; ``lowbit report DIR1 DIR2 --out R`` must show every measured
number in its cell, the float baseline found by itself, every plot there is data for, and rebuild
commands that lowbit's own parser turns back into the saved settings (checked for every method too)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from lowbit.config import CalibConfig, Method, QuantConfig
from lowbit.qat.config import QATConfig
from lowbit.report.reproduce import quantize_command, saved_settings, settings_of

from helpers import build_tiny_model, make_text, private_lowbit_cache

PNG = b"\x89PNG\r\n\x1a\n"
EVAL = ["--seqlen", "64", "--max-tokens", "512", "--tasks", "cloze", "--cloze-passages", "8", "--cloze-context", "32",
        "--quiet"]


def table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under ``## heading`` as ``{first cell: {column: cell}}``."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return {r[0]: dict(zip(header, r)) for r in body}


def number(cell: str) -> float:
    """The first number of a cell (``'12.3 (float32)'`` → 12.3, ``'+1.20 %'`` → 1.2)."""
    m = re.search(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", cell)
    assert m, f"no number in cell {cell!r}"
    return float(m.group(0))


def mib(cell: str) -> float:
    v = number(cell)
    return v * 1024 if "GiB" in cell else v


def same_bytes(cell: str, n_bytes: float) -> bool:
    """A ``'0.10 MiB'`` / ``'1.23 GiB'`` cell shows ``n_bytes`` (to its two decimals)."""
    return mib(cell) == pytest.approx(n_bytes / 2**20, rel=0.01, abs=0.0051 * (1024 if "GiB" in cell else 1))


def seconds(cell: str) -> float:
    return number(cell) * (60 if "min" in cell else 1)


def run_scenario(root, fp_source: str, quantize: dict[str, list[str]], eval_args: list[str],
                 bench_args: list[str]) -> dict:
    """The user's first try, in ``root`` with a private lowbit cache: quantize the folders ``m/<name>``
    (``quantize``: name → flags), evaluate each on ``my_eval.txt`` (the second also on ``other.txt``),
    compare the first to the float model (``--kld``) and bench it, ask for a report before the float
    model is evaluated, run the command that report names, and write the report ``R``."""
    cache = private_lowbit_cache(root / "cache")
    env = {**os.environ, "LOWBIT_CACHE": str(cache)}

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                           timeout=1800, env=env, cwd=root)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        return r

    js = root / "elsewhere"
    js.mkdir()
    names = list(quantize)
    for i, (name, flags) in enumerate(quantize.items()):
        cli("quantize", fp_source, *flags, "--out", f"m/{name}", "--json", js / f"q{i}.json", "--quiet")
    for name in names:
        cli("eval", f"m/{name}", "--text", "my_eval.txt", *eval_args, "--json", js / f"e-{name}.json")
    ppl_args = [a for a in eval_args[:eval_args.index("--tasks")]]
    cli("eval", f"m/{names[1]}", "--text", "other.txt", *ppl_args, "--quiet")
    cli("eval", f"m/{names[0]}", "--text", "my_eval.txt", *ppl_args, "--kld", fp_source, "--json", js / "kld.json",
        "--quiet")
    cli("bench", f"m/{names[0]}", "--json", js / "b.json", *bench_args, "--quiet")
    cli("report", *(f"m/{n}" for n in names), "--out", "R0")   # the float model not evaluated yet
    md0 = (root / "R0" / "report.md").read_text()
    hint = re.search(r"No float baseline on this text: `(lowbit eval [^`]+)`", md0)
    assert hint, md0
    cli(*shlex.split(hint.group(1))[1:], "--json", js / "fp.json", "--quiet")      # what the report said to run
    cli("report", *(f"m/{n}" for n in names), "--out", "R")
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    return {"root": root, "names": names, "fp_source": fp_source,
            "bench_args": {k: int(v) for k, v in zip(bench_args[::2], bench_args[1::2])},
            "md": (root / "R" / "report.md").read_text(),
            "q": {n: load(root / "m" / n / "lowbit.json") for n in names},
            "e": {n: load(js / f"e-{n}.json") for n in names}, "kld": load(js / "kld.json"),
            "b": load(js / "b.json"), "fp": load(js / "fp.json"), "benches": load(root / "m" / names[0] / "benches.json")}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    (root / "my_calib.txt").write_text(make_text(4000, seed=21))
    (root / "my_eval.txt").write_text(make_text(3000, seed=22))
    (root / "other.txt").write_text(make_text(2000, seed=23))
    build_tiny_model("llama", root / "fp", make_text(6000, seed=0))
    return run_scenario(root, "fp", {
        "gptq-w4": ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", "my_calib.txt",
                    "--nsamples", "8", "--seqlen", "64"],
        "rtn-w3": ["--method", "rtn", "--bits", "3", "--group-size", "32", "--sym", "--head-bits", "8", "--no-mse"]},
        EVAL, ["--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "2", "--threads", "1"])


@pytest.mark.e2e
def test_quantize_records_time_memory_machine(scenario):
    check_run_records(scenario)


@pytest.mark.e2e
def test_bench_is_recorded_in_the_folder(scenario):
    check_bench(scenario)


@pytest.mark.e2e
def test_report_fills_every_measured_cell(scenario):
    check_cells(scenario)


@pytest.mark.e2e
def test_every_plot_exists_and_is_referenced(scenario):
    check_plots(scenario)


@pytest.mark.e2e
def test_reproduce_commands_rebuild_the_saved_settings(scenario):
    check_reproduce(scenario)
    repro = scenario["md"].split("## How to reproduce", 1)[1]
    assert "--head-bits 8" in repro and "--no-mse" in repro and "--sym" in repro and "--calib my_calib.txt" in repro


@pytest.mark.slow
def test_poc_report_on_the_demo_model(tmp_path):
    """The same scenario on SmolLM2-135M (RTN only, a short own text, few bench tokens)."""
    from lowbit.data import read_text

    plays = read_text("default", split="eval")
    (tmp_path / "my_eval.txt").write_text(plays[:60000])
    (tmp_path / "other.txt").write_text(plays[60000:100000])
    s = run_scenario(tmp_path, "smollm2-135m", {
        "rtn-w4": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym", "--no-mse"],  # = Q4_0 for llama.cpp
        "rtn-w3": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--sym", "--head-bits", "8", "--no-mse"]},
        ["--seqlen", "256", "--max-tokens", "1024", "--tasks", "cloze", "--cloze-passages", "20", "--cloze-context",
         "64", "--quiet"], ["--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1"])
    for check in (check_run_records, check_bench, check_cells, check_plots, check_reproduce):
        check(s)
    assert 1.0 <= s["fp"]["ppl"] < s["e"]["rtn-w3"]["ppl"] and s["kld"]["kld"] > 0
    if shutil.which("llama-bench"):  # the lossless Q4_0 export timed by llama.cpp
        assert s["b"]["llama_cpp"]["decode_tokens_per_s"] > 0 and s["b"]["llama_cpp"]["prefill_tokens_per_s"] > 0


# ---- what an independent reader checks in the scenario's files --------------------------------------------

def check_run_records(scenario):
    for meta in scenario["q"].values():
        run = meta["quantize"]
        assert run["seconds"] > 0 and run["peak_rss_bytes"] > 2**20
        m = run["machine"]
        assert m["cpu"] and m["threads"] >= 1 and m["device"] == "cpu" and m["torch"].startswith("2.")


def check_bench(scenario):
    runs, b = scenario["benches"], scenario["b"]
    assert len(runs) == 1 and runs[0]["result"]["decode_tokens_per_s"] == b["decode_tokens_per_s"]
    assert runs[0]["settings"]["new_tokens"] == b["new_tokens"] == scenario["bench_args"]["--new-tokens"]
    assert runs[0]["date"]
    by = b["by_dtype"]
    assert set(by) == {"float32", "bfloat16"}          # both dtypes timed, each phase keeps its faster one
    assert b["prefill_dtype"] == max(by, key=lambda d: by[d]["prefill_tokens_per_s"])
    assert b["dtype"] == max(by, key=lambda d: by[d]["decode_tokens_per_s"])
    assert b["prefill_tokens_per_s"] == by[b["prefill_dtype"]]["prefill_tokens_per_s"]
    assert b["fp_prefill_tokens_per_s"] == max(v["prefill_tokens_per_s"] for v in b["fp_by_dtype"].values())
    assert b["machine"]["threads"] == b["threads"]
    assert "llama_cpp" in b and ("skipped" in b["llama_cpp"] or b["llama_cpp"]["decode_tokens_per_s"] > 0)


def check_cells(scenario):
    md, q, e, kld, b, fp = (scenario[k] for k in ("md", "q", "e", "kld", "b", "fp"))
    first, second = scenario["names"]
    fp_label = f"FP ({os.path.basename(scenario['fp_source'])})"
    assert "No float baseline" not in md and f"against the float baseline {fp_label}" in md
    assert "quality on the text `my_eval.txt`" in md and "Also evaluated on: `other.txt`" in md
    rows = table(md, "Comparison")
    assert set(rows) == {fp_label, first, second}
    assert number(rows[fp_label]["ppl"]) == pytest.approx(fp["ppl"], rel=1e-4)
    assert number(rows[fp_label]["cloze acc"]) == pytest.approx(fp["cloze_accuracy"], abs=1e-4)
    assert same_bytes(rows[fp_label]["weight memory"], fp["model_bytes"])
    assert mib(rows[fp_label]["size on disk"]) > 0
    for name in (first, second):
        r, meta = rows[name], q[name]
        ppl = kld["ppl"] if name == first else e[name]["ppl"]      # the latest ppl on this text
        assert number(r["ppl"]) == pytest.approx(ppl, rel=1e-4)
        assert number(r["Δppl vs FP"]) == pytest.approx((ppl - fp["ppl"]) / fp["ppl"] * 100, abs=0.01)
        assert number(r["cloze acc"]) == pytest.approx(e[name]["cloze_accuracy"], abs=1e-4)
        assert number(r["bits/weight"]) == pytest.approx(meta["bits_per_weight"], abs=1e-3)
        assert same_bytes(r["weight memory"], e[name]["model_bytes"])
        assert mib(r["size on disk"]) > 0
        shown = r["quantize time"]                                    # "12.3 s" or, from 2 minutes on, "18.2 min"
        assert seconds(shown) == pytest.approx(meta["quantize"]["seconds"], abs=3.01 if "min" in shown else 0.051)
        assert same_bytes(r["quantize peak RSS"], meta["quantize"]["peak_rss_bytes"])
    assert number(rows[first]["KLD"]) == pytest.approx(kld["kld"], abs=1e-5)
    assert number(rows[first]["top-1"]) == pytest.approx(kld["top1_agreement"], abs=1e-4)
    assert rows[second]["KLD"] == "–"
    ab = table(md, "A/B against the reference")[first]
    assert number(ab["ppl ratio"]) == pytest.approx(kld["ppl_ratio"], abs=1e-4)
    assert ab["reference"] == f"`{scenario['fp_source']}`"
    speed = table(md, "Speed and memory")
    assert number(speed[first]["decode tok/s"]) == pytest.approx(b["decode_tokens_per_s"], abs=0.05)
    assert f"({b['dtype']})" in speed[first]["decode tok/s"]
    assert number(speed[first]["prefill tok/s"]) == pytest.approx(b["prefill_tokens_per_s"], abs=0.05)
    assert f"({b['prefill_dtype']})" in speed[first]["prefill tok/s"]
    assert number(speed[first]["FP decode tok/s"]) == pytest.approx(b["fp_decode_tokens_per_s"], abs=0.05)
    assert number(speed[fp_label]["decode tok/s"]) == pytest.approx(b["fp_decode_tokens_per_s"], abs=0.05)
    assert number(speed[fp_label]["prefill tok/s"]) == pytest.approx(b["fp_prefill_tokens_per_s"], abs=0.05)
    assert number(speed[first]["decode speedup"]) == pytest.approx(b["decode_speedup"], abs=0.005)
    assert same_bytes(speed[first]["peak RSS"], b["peak_rss_bytes"])
    assert speed[second]["decode tok/s"] == "–"
    if "decode_tokens_per_s" in b["llama_cpp"]:
        assert number(speed[first]["llama.cpp decode tok/s"]) == pytest.approx(b["llama_cpp"]["decode_tokens_per_s"],
                                                                               abs=0.05)
    else:
        assert "llama.cpp (`llama-bench`) not measured" in md
    machine = md.split("## Machine", 1)[1].split("\n## ", 1)[0]
    assert q[first]["quantize"]["machine"]["cpu"] in machine and f"bench {first}" in machine
    checks = md.split("## PoC checklist", 1)[1].split("\n## ", 1)[0]
    for name in (first, second):
        assert re.search(rf"\*\*(PASS|FAIL)\*\* {name}: ppl [-+]\d", checks), checks
    assert f"Not measured: speed for {second}" in checks and "Not measured: quantize time" not in checks


def check_plots(scenario):
    out, md = scenario["root"] / "R", scenario["md"]
    for name in ("quality_ppl.png", "quality_cloze.png", "quality_kld.png", "speed.png", "prefill.png", "memory.png",
                 "peak_rss.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in md, name
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md"] + re.findall(r"\]\((\w+\.png)\)", md))


def check_reproduce(scenario):
    repro = scenario["md"].split("## How to reproduce", 1)[1]
    first = scenario["names"][0]
    for name, meta in scenario["q"].items():
        line = next(line for line in repro.splitlines() if line.startswith("lowbit quantize") and f"m/{name}" in line)
        argv = shlex.split(line)[2:]
        assert argv[argv.index("--out") + 1] == f"m/{name}"
        argv = argv[:argv.index("--out")]
        assert settings_of(argv, meta["calibration"] is not None) == saved_settings(meta), line
    bench = shlex.join(["lowbit", "bench", f"m/{first}"] + [str(w) for kv in scenario["bench_args"].items() for w in kv])
    assert f"--kld {scenario['fp_source']}" in repro and any(line.startswith(bench) for line in repro.splitlines())


def _meta(quant: QuantConfig, calib: CalibConfig | None, qat: QATConfig | None = None) -> dict:
    meta = {"method": quant.method.value, "config": quant.to_json(), "source": {"kind": "folder", "path": "/m/fp"},
            "calibration": None if calib is None else {**calib.to_json(), "fingerprint": "0123"}}
    return {**meta, **({"qat": qat.to_json()} if qat else {})}


CAL = dict(source="my.txt", nsamples=16, seqlen=128, seed=3, batch_size=2, dtype="float32", true_sequential=False)
CASES = {
    "rtn": (dict(bits=3, group_size=-1, sym=True, mse=False, head_bits=8), None, None),
    "gptq": (dict(act_order=False, static_groups=False, damp=0.05, block_size=64),
             dict(CAL, fp_targets=True, offload="disk"), None),
    "foem": (dict(bits=3, beta=0.2, pullback="all"), dict(CAL, fp_targets=False), None),
    "gwq": (dict(outlier_frac=0.02, saliency="hessian", outlier_select="row", gwq_solver="rtn"),
            dict(CAL, grad_samples=4, grad_checkpointing=True), None),
    "squeeze": (dict(group_size=64, binary_frac=0.7, high_bits=3, squeeze_score="magnitude", squeeze_staged=False,
                     binary_residual=True, finetune=True, ft_steps=5, ft_lr=0.01), dict(CAL, fp_targets=False), None),
    "quip": (dict(bits=2, codebook="scalar", rht=False, scale_search=False, finetune=True, ft_steps=7, ft_lr=0.002),
             CAL, None),
    "dlqat": (dict(bits=3, group_size=64), dict(source="my.txt", seed=5, batch_size=2, seqlen=128),
              dict(steps=10, lora_rank=4, lr=0.002, distill=True, grad_accum=2, warmup=3, save_every=5, init="gptq",
                   train_text="train.txt", seed=5, batch_size=2)),
}


CASES["gptq-gguf"] = (dict(gguf_type="Q4_K", damp=0.02), CAL, None)  # a GGUF grid (issue 16)


@pytest.mark.parametrize("case", [m.value for m in Method] + ["gptq-gguf"])
def test_rebuild_command_for_every_method(case):
    """Non-default settings of every kind (values, flags, --no-… flags, calibration, DL-QAT): the command
    parsed by lowbit's own parser gives exactly the saved settings."""
    qkw, ckw, tkw = CASES[case]
    method = case.partition("-")[0]
    meta = _meta(QuantConfig(method=method, **qkw), None if ckw is None else CalibConfig(**ckw),
                 None if tkw is None else QATConfig(**tkw))
    cmd, missing = quantize_command(meta, "out/x")
    assert missing == [], cmd
    argv = shlex.split(cmd)[2:-2]
    assert shlex.split(cmd)[-2:] == ["--out", "out/x"] and argv[0] == "/m/fp"
    assert settings_of(argv, ckw is not None) == saved_settings(meta), cmd
    defaults = settings_of(["/m/fp", "--method", method], ckw is not None)
    assert defaults != saved_settings(meta)          # the case really has settings to carry over


def test_a_setting_without_a_flag_is_named():
    """Every setting has a flag now (``--rht-seed`` had none); one no flag rebuilds (a newer lowbit's) is named."""
    meta = _meta(QuantConfig(method="quip", bits=2, rht_seed=7), CalibConfig())
    cmd, missing = quantize_command(meta, "o")
    assert missing == [] and "--method quip" in cmd and "--rht-seed 7" in cmd
    meta["config"]["future_knob"] = 3
    cmd, missing = quantize_command(meta, "o")
    assert missing == ["future_knob=3"] and "--rht-seed 7" in cmd


class _Tok:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1, 2, 3]}


def test_bench_times_again_then_refuses_noise(monkeypatch):
    """A busy machine can make t_gen(N) <= t_gen(1): the decode is timed again, and never reported as garbage."""
    from lowbit.deploy import bench as bench_mod
    from lowbit.errors import LowbitError

    times = iter([(0.5, 0.5), (2.0, 2.0), (1.0, 1.0), (2.0, 2.0), (4.0, 4.0)])   # prefill; (t1, tn) twice
    calls = []

    def fake(fn, repeats):
        calls.append(repeats)
        return next(times)

    monkeypatch.setattr(bench_mod, "_median_time", fake)
    r = bench_mod.time_model(object(), _Tok(), 8, 5, 3)
    assert calls == [3, 3, 3, 6, 6]                                      # the second try with twice the repeats
    assert r["decode_tokens_per_s"] == pytest.approx(4 / 2.0) and r["prefill_tokens_per_s"] == pytest.approx(16)
    monkeypatch.setattr(bench_mod, "_median_time", lambda fn, repeats: (1.0, 1.0))
    with pytest.raises(LowbitError, match="decode timing failed"):
        bench_mod.time_model(object(), _Tok(), 8, 5, 3)
