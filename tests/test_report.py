"""``lowbit report``: two RTN folders of a tiny model evaluated with the CLI, the float baseline,
bench data, the Pareto front, missing data and the one-line errors."""
import json
import os
import subprocess
import sys

import pytest

import lowbit
from lowbit.cli import main
from lowbit.report.collect import collect_lowbit, delta_pct, merge_evals, pareto_front

from helpers import build_tiny_model, make_text, private_lowbit_cache

PNG = b"\x89PNG\r\n\x1a\n"
EVAL = ["--seqlen", "64", "--max-tokens", "256", "--tasks", "cloze", "--cloze-passages", "10",
        "--cloze-context", "32", "--quiet"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """lowbit's cache (float-model evaluations) in a temporary folder, for this module and its subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        cache = private_lowbit_cache(tmp_path_factory.mktemp("cache"))
        mp.setenv("LOWBIT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory, private_cache):
    """A tiny float model, two RTN folders (w2, w4) evaluated by ``lowbit eval``, and the FP eval JSON."""
    root = tmp_path_factory.mktemp("report")
    text = root / "text.txt"
    text.write_text(make_text(6000, seed=5))
    fp = build_tiny_model("llama", root / "fp", text.read_text())
    dirs = []
    for bits in (2, 4):
        out = root / f"rtn-w{bits}"
        lowbit.quantize(str(fp), method="rtn", bits=bits, group_size=32, out=out, progress=False)
        r = _cli("eval", out, "--text", text, *EVAL)
        assert r.returncode == 0, r.stderr
        dirs.append(out)
    r = _cli("eval", fp, "--text", text, *EVAL, "--json", root / "fp.json")
    assert r.returncode == 0, r.stderr
    return {"root": root, "text": text, "fp": fp, "dirs": dirs, "fp_json": root / "fp.json"}


@pytest.mark.e2e
def test_report_from_two_folders(setup, tmp_path):
    out = tmp_path / "rep"
    r = _cli("report", *setup["dirs"], "--fp", setup["fp"], "--fp-json", setup["fp_json"],
             "--text", setup["text"], "--out", out)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| rtn-w") or line.startswith("| FP (fp)")]
    assert len(rows) == 3, md
    w2 = next(line for line in rows if line.startswith("| rtn-w2 "))
    assert "| rtn | w2 g32 asym |" in w2 and " % |" in w2     # Δ vs FP is filled in
    assert "## How to reproduce" in md and "lowbit quantize" in md and "--method rtn --bits 2" in md
    assert "## PoC checklist" in md and "Pareto-optimal" in md
    for name in ("quality_ppl.png", "quality_cloze.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in md
    assert not (out / "speed.png").exists() and "Speed and memory" not in md   # no bench data: no speed plot
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]     # no temporary leftovers


@pytest.mark.e2e
def test_bench_json_adds_speed(setup, tmp_path):
    d = setup["dirs"][1]
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"decode_tokens_per_s": 42.0, "fp_decode_tokens_per_s": 21.0, "decode_speedup": 2.0,
                                 "prefill_tokens_per_s": 900.0, "weight_memory_ratio": 0.31, "peak_rss_bytes": 2**30}))
    out = tmp_path / "rep"
    assert main(["report", *map(str, setup["dirs"]), "--bench", f"{d}={bench}", "--text", str(setup["text"]),
                 "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Speed and memory" in md and "42.0" in md and "2.00×" in md and "1.00 GiB" in md
    assert (out / "speed.png").read_bytes()[:8] == PNG
    assert "against the float baseline FP (fp)" in md and "Δppl vs FP" in md   # found in the cache
    speed = md.split("## Speed and memory")[1].split("\n## ")[0]
    fp_row = next(line for line in speed.splitlines() if line.startswith("| FP (fp) |"))
    assert fp_row.split(" | ")[1] == "21.0"                    # the float model's decode speed from the bench
    # written again over an existing report: replaced whole
    assert main(["report", str(setup["dirs"][0]), "--text", str(setup["text"]), "--out", str(out)]) == 0
    assert "rtn-w4" not in (out / "report.md").read_text() and not (out / "speed.png").exists()


@pytest.mark.e2e
def test_missing_data_shows_dashes(setup, tmp_path):
    bare = tmp_path / "bare"
    lowbit.quantize(str(setup["fp"]), method="rtn", bits=3, group_size=32, out=bare, progress=False)
    out = tmp_path / "rep"
    assert main(["report", str(bare), "--out", str(out)]) == 0        # never evaluated
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| bare "))
    assert row.count("–") >= 5 and "Not measured: perplexity" in md
    assert (out / "memory.png").exists() and not (out / "quality_ppl.png").exists()


@pytest.mark.e2e
def test_not_a_lowbit_folder_is_one_line(setup, tmp_path, capsys):
    assert main(["report", str(setup["fp"]), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a lowbit checkpoint" in err
    assert not (tmp_path / "r").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["report", str(setup["dirs"][0]), "--out", str(other)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (other / "notes.txt").exists()
    assert main(["report", str(setup["dirs"][0]), "--fp-json", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_evals_history_is_merged_per_text():
    recs = [{"text": "default", "seqlen": 512, "max_tokens": 20480, "metrics": {"ppl": 20.0, "seqlen": 512}},
            {"text": "other", "seqlen": 64, "metrics": {"ppl": 99.0}},
            {"text": "default", "seqlen": 512, "metrics": {"ppl": None, "seqlen": 512, "cloze_accuracy": 0.25,
                                                           "tasks": {"cloze": {"acc": 0.25}}}},
            {"text": "default", "metrics": {"ppl": None, "tasks": {"hellaswag": {"acc": 0.3}}}}]
    metrics, protocol, used = merge_evals(recs, "default")
    assert metrics["ppl"] == 20.0 and metrics["cloze_accuracy"] == 0.25
    assert set(metrics["tasks"]) == {"cloze", "hellaswag"} and len(used) == 3
    assert protocol == {"text": "default", "seqlen": 512, "max_tokens": 20480, "bos": None}


@pytest.mark.e2e
def test_collect_reads_meta_and_sizes(setup):
    e = collect_lowbit(setup["dirs"][0], text=str(setup["text"]))
    assert e.method == "rtn" and e.config["bits"] == 2 and 2 < e.bits_per_weight < 3
    assert e.disk_bytes > 0 and e.get("ppl") > 1 and 0 <= e.get("cloze_accuracy") <= 1
    assert e.quantize_seconds is None or e.quantize_seconds > 0


def test_pareto_front_on_synthetic_points():
    pts = [(2.0, 30.0), (3.0, 12.0), (4.0, 10.0), (4.0, 11.0), (4.5, 10.5), (16.0, 9.0), (16.0, 9.0), (5.0, 40.0)]
    assert pareto_front(pts) == [0, 1, 2, 5, 6]                 # equal points both stay; (4, 11) is dominated
    acc = [(2.0, 0.1), (3.0, 0.3), (4.0, 0.3), (16.0, 0.5)]
    assert pareto_front(acc, maximize_y=True) == [0, 1, 3]      # (4, 0.3) is no better than (3, 0.3)
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]
    assert delta_pct(10.5, 10.0) == pytest.approx(5.0) and delta_pct(None, 1.0) is None and delta_pct(1.0, 0) is None
