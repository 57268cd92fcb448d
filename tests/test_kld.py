"""``lowbit eval A --kld B``: the KL divergence KL(P_B ‖ P_A) of the next-token distributions, top-1
agreement and ppl ratio — by hand on tiny logits, in the right direction, zero for a model against
itself, and through the command line (JSON, evals.json, one-line errors)."""
import json
import math
import shutil

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.data import eval_windows, read_text, tokenize
from lowbit.eval.kld import kl_divergence, summarize, token_stats
from lowbit.models.sources import load_model

from helpers import build_tiny_model, make_text, private_lowbit_cache


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_token_stats_by_hand():
    a = [[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]        # model A's logits at two positions
    b = [[1.0, 1.2, 0.0], [0.5, 2.0, 0.0]]         # the reference B's
    targets = [1, 2]
    s = token_stats(torch.tensor(a), torch.tensor(b), torch.tensor(targets))
    for t in range(2):
        q, p = _softmax(a[t]), _softmax(b[t])
        kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        assert float(s["kl"][t]) == pytest.approx(kl, rel=1e-6)
        assert float(s["nll"][t]) == pytest.approx(-math.log(q[targets[t]]), rel=1e-6)
        assert float(s["nll_ref"][t]) == pytest.approx(-math.log(p[targets[t]]), rel=1e-6)
    assert s["same_top1"].tolist() == [False, False]   # argmax A = 0, 2; argmax B = 1, 1
    assert bool(token_stats(torch.tensor([[0.0, 5.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([0]))["same_top1"][0])


def test_direction_is_reference_first():
    """P (reference) = [0.5, 0.5], Q (model) = [0.9, 0.1]: KL(P‖Q) = 0.5108…, KL(Q‖P) = 0.3681…"""
    logq, logp = torch.tensor([[math.log(0.9), math.log(0.1)]]), torch.tensor([[math.log(0.5), math.log(0.5)]])
    kl = float(token_stats(logq, logp, torch.tensor([0]))["kl"][0])
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    assert kl == pytest.approx(0.5108256, rel=1e-6) and abs(kl - 0.3680642) > 0.1
    swapped = float(token_stats(logp, logq, torch.tensor([0]))["kl"][0])
    assert swapped == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-6)


def test_summarize_means_and_ratio():
    kl = torch.tensor([0.0, 0.2, 0.4, 1.0], dtype=torch.float64)
    nll, nll_ref = torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([1.0, 1.5, 2.5, 2.0])
    r = summarize(kl, torch.tensor([True, True, False, True]), nll.double(), nll_ref.double())
    assert r["kld"] == pytest.approx(0.4) and r["kld_max"] == pytest.approx(1.0) and r["tokens_scored"] == 4
    assert r["top1_agreement"] == pytest.approx(0.75)
    assert r["ppl"] == pytest.approx(math.exp(2.0)) and r["ppl_reference"] == pytest.approx(math.exp(1.75))
    assert r["ppl_ratio"] == pytest.approx(math.exp(0.25))
    assert r["kld_stderr"] == pytest.approx(float(kl.std()) / 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kld")
    text = root / "eval.txt"
    text.write_text(make_text(3000, seed=11))
    fp = build_tiny_model("llama", root / "fp", make_text(6000, seed=3))
    q = root / "w2"
    lowbit.quantize(str(fp), method="rtn", bits=2, group_size=32, out=q, progress=False)
    return {"root": root, "text": text, "fp": fp, "q": q}


def test_model_against_itself_is_zero(models):
    model, tok, _ = load_model(str(models["fp"]))
    windows = eval_windows(tokenize(tok, read_text(str(models["text"]))), 64, 256)
    r = kl_divergence(model, model, windows, batch_size=2)
    assert r["kld"] == pytest.approx(0.0, abs=1e-9) and r["kld_max"] == pytest.approx(0.0, abs=1e-9)
    assert r["top1_agreement"] == 1.0 and r["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert r["tokens_scored"] == windows.shape[0] * 63


def test_cli_kld_json_and_history(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(private_lowbit_cache(tmp_path / "cache")))
    out = tmp_path / "e.json"
    assert main(["eval", str(models["q"]), "--text", str(models["text"]), "--seqlen", "64", "--max-tokens", "256",
                 "--kld", str(models["fp"]), "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["kld"] > 0.01 and 0 <= r["top1_agreement"] < 1 and r["kld_reference"] == str(models["fp"])
    assert r["ppl_ratio"] == pytest.approx(r["ppl"] / r["ppl_reference"], rel=1e-9)
    assert "KLD" in capsys.readouterr().out
    # the same windows as a plain eval: the ppl is the folder's perplexity, the reference's the float model's
    assert main(["eval", str(models["q"]), "--text", str(models["text"]), "--seqlen", "64", "--max-tokens", "256",
                 "--json", str(tmp_path / "p.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert main(["eval", str(models["fp"]), "--text", str(models["text"]), "--seqlen", "64", "--max-tokens", "256",
                 "--json", str(tmp_path / "f.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["ppl"] == pytest.approx(r["ppl_reference"], rel=1e-5)
    rec = json.loads((models["q"] / "evals.json").read_text())
    kld_rec = next(x for x in rec if x.get("kld_reference"))
    assert kld_rec["metrics"]["kld"] == pytest.approx(r["kld"])


def test_kld_other_vocabulary_is_one_line(models, tmp_path, capsys):
    other = tmp_path / "other"        # the same weights, but two token ids swapped: another vocabulary
    shutil.copytree(models["fp"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    assert main(["eval", str(models["q"]), "--text", str(models["text"]), "--seqlen", "64", "--max-tokens", "256",
                 "--kld", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kld" in err and "vocabulary" in err
    assert main(["eval", str(models["q"]), "--kld", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
