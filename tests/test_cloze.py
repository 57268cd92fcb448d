"""The offline cloze task (passages, greedy-exact accuracy, NLL), ``lowbit eval --tasks`` and the
lm-eval wrapper (a local task YAML, the one-line errors)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval import harness
from lowbit.eval.cloze import STOPWORDS, cloze_accuracy, passages, score_passages

from helpers import build_tiny_model, make_text, make_tokenizer


@pytest.fixture(scope="module")
def text():
    return make_text(8000, seed=3)


@pytest.fixture(scope="module")
def tok(text):
    return make_tokenizer(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, text):
    return build_tiny_model("llama", tmp_path_factory.mktemp("cloze") / "llama", text)


class Oracle(nn.Module):
    """Logits ``scale`` on a chosen token, 0 elsewhere: ``shift`` 0 predicts the true next token
    (it peeks), ``shift`` 1 the token after it in the vocabulary (always wrong); ``wrong_after``:
    wrong at positions whose input token is that id."""

    def __init__(self, vocab, shift=0, scale=20.0, wrong_after=None):
        super().__init__()
        self.vocab, self.shift, self.scale, self.wrong_after = vocab, shift, scale, wrong_after
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        nxt = (torch.roll(input_ids, -1, dims=1) + self.shift) % self.vocab
        if self.wrong_after is not None:
            nxt = torch.where(input_ids == self.wrong_after, (nxt + 1) % self.vocab, nxt)
        return type("Out", (), {"logits": nn.functional.one_hot(nxt, self.vocab).float() * self.scale})()


def test_passages_are_deterministic_whole_words(text, tok):
    state = torch.random.get_rng_state()
    a = passages(text, tok, n_passages=25, context_tokens=32, seed=0)
    assert a == passages(text, tok, n_passages=25, context_tokens=32, seed=0)
    assert a != passages(text, tok, n_passages=25, context_tokens=32, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(a) == 25
    for ctx, target, word in a:
        assert 0 < len(ctx) <= 32 and target
        assert word.isalpha() and word.isascii() and len(word) >= 3 and word.lower() not in STOPWORDS
        assert tok.decode(target) == " " + word           # the target is the whole word, nothing more
        piece = tok.decode(ctx[-8:]) + " " + word          # the passage ends at that word in the text,
        assert re.search(re.escape(piece) + r"(?![\w'’-])", text)  # and the word ends there too


def test_passages_are_consecutive_in_text_order(text, tok):
    items = passages(text, tok, n_passages=10_000, context_tokens=16, seed=0)  # all of them
    positions, pos = [], 0
    for ctx, _, word in items:
        pos = text.index(tok.decode(ctx[-4:]) + " " + word, pos)
        positions.append(pos)
    assert positions == sorted(positions) and len(items) > 100


def test_oracle_models_give_one_and_zero(text, tok):
    right = cloze_accuracy(Oracle(len(tok)), tok, text, n_passages=30, context_tokens=24)
    wrong = cloze_accuracy(Oracle(len(tok), shift=1), tok, text, n_passages=30, context_tokens=24)
    assert right["cloze_accuracy"] == 1.0 and right["cloze_passages"] == 30
    assert wrong["cloze_accuracy"] == 0.0 and wrong["cloze_passages"] == 30
    assert right["cloze_nll"] < 1e-4 < 19 < wrong["cloze_nll"]


def test_every_token_of_the_word_must_be_right():
    """Golden values: the second passage's word has two tokens and the model misses the second one."""
    V, s = 10, 5.0
    items = [([1, 2, 3], [6], "one"), ([1, 2, 3], [4, 5], "two")]
    right, nll, n = score_passages(Oracle(V, scale=s, wrong_after=4), items, batch_size=2)
    p_hit = math.exp(s) / (math.exp(s) + V - 1)
    p_miss = 1 / (math.exp(s) + V - 1)
    assert (right, n) == (1, 3)
    assert nll == pytest.approx(-2 * math.log(p_hit) - math.log(p_miss), rel=1e-5)
    # batch size does not matter (right padding never reaches the scored positions)
    assert score_passages(Oracle(V, scale=s, wrong_after=4), items, batch_size=1) == (right, pytest.approx(nll), n)


def test_tiny_model_values_in_range(tiny, text):
    model, tk, _ = lowbit.load_any(str(tiny), device="cpu")
    r = cloze_accuracy(model, tk, text, n_passages=20, context_tokens=32, batch_size=5)
    assert 0.0 <= r["cloze_accuracy"] <= 1.0 and r["cloze_nll"] > 0 and r["cloze_passages"] == 20
    again = cloze_accuracy(model, tk, text, n_passages=20, context_tokens=32, batch_size=3)
    assert again["cloze_accuracy"] == r["cloze_accuracy"] and again["cloze_nll"] == pytest.approx(r["cloze_nll"], rel=1e-4)


def test_bad_settings_and_short_text(tok):
    with pytest.raises(LowbitError, match="cloze-passages"):
        passages("x " * 100, tok, n_passages=0)
    with pytest.raises(LowbitError, match="no passage"):
        passages("the of and it is.", tok, n_passages=5, context_tokens=8)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.e2e
def test_cli_tasks_json_and_evals_history(tiny, text, tmp_path):
    src = tmp_path / "plays.txt"
    src.write_text(text)
    ej = tmp_path / "e.json"
    r = _cli("eval", tiny, "--tasks", f"cloze:{src}", "--no-ppl", "--cloze-passages", "12", "--cloze-context", "32",
             "--json", ej, "--quiet")
    assert r.returncode == 0, r.stderr
    e = json.loads(ej.read_text())
    assert {"ppl", "tokens_scored", "seqlen", "bits_per_weight", "model_bytes", "seconds",
            "cloze_accuracy", "cloze_nll", "cloze_passages", "tasks"} <= set(e)
    assert e["ppl"] is None and e["cloze_passages"] == 12 and f"cloze:{src}" in e["tasks"]
    assert not (tiny / harness.EVALS_FILE).exists()           # a float model folder gets no history
    q = tmp_path / "q"
    lowbit.quantize(str(tiny), method="rtn", bits=4, group_size=32, out=q, progress=False)
    for extra in ([], ["--no-ppl", "--tasks", "cloze", "--cloze-passages", "8", "--cloze-context", "32"]):
        r = _cli("eval", q, "--text", src, "--seqlen", "64", "--max-tokens", "256", "--quiet", *extra)
        assert r.returncode == 0, r.stderr
    records = json.loads((q / harness.EVALS_FILE).read_text())
    assert len(records) == 2 and all({"date", "text", "seqlen", "max_tokens", "metrics"} <= set(x) for x in records)
    assert records[0]["metrics"]["ppl"] > 1 and records[1]["metrics"]["cloze_passages"] == 8


def test_no_ppl_without_tasks_is_an_error(tiny, capsys):
    from lowbit.cli import main

    assert main(["eval", str(tiny), "--no-ppl", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-ppl" in err


def test_missing_lm_eval_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    harness.check_available(["cloze", "cloze:x.txt"])  # the cloze task needs nothing
    with pytest.raises(LowbitError, match=r"pip install 'lowbit\[eval\]'"):
        harness.check_available(["cloze", "hellaswag"])


def _task_yaml(tmp_path, name, dataset_lines):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in dataset_lines))
    y = tmp_path / f"{name}.yaml"
    y.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                 "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                 "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
                 "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return y


@pytest.mark.e2e
def test_lm_eval_local_task_and_offline_errors(tiny, tmp_path):
    """A multiple-choice task over a local JSON file runs offline; its two choices are the same
    text, so the model scores them equally, lm-eval picks the first, and exactly the documents with
    label 0 count as right: accuracy 2/4 whatever the model."""
    pytest.importorskip("lm_eval")
    docs = [{"question": q, "choices": [" crown", " crown"], "label": i % 2}
            for i, q in enumerate(["The king wore a", "The sun and the", "Thou art", "Fair is"])]
    y = _task_yaml(tmp_path, "lowbit_local_mc", docs)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    ej = tmp_path / "e.json"
    r = _cli("eval", tiny, "--tasks", y, "--no-ppl", "--json", ej, "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    t = json.loads(ej.read_text())["tasks"]["lowbit_local_mc"]
    assert t["acc"] == 0.5 and t["n"] == 4
    bad = tmp_path / "remote.yaml"
    bad.write_text(y.read_text().replace("dataset_path: json", "dataset_path: no-such-org/no-such-data")
                   .replace("lowbit_local_mc", "lowbit_remote"))
    r = _cli("eval", tiny, "--tasks", bad, "--no-ppl", "--quiet", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lowbit: error: lm-eval could not load task") and "(no internet?)" in r.stderr
