"""Text sources, the embedded corpus and the windows cut from token ids."""
import json

import pytest
import torch

from lowbit.data import EVAL_PLAYS, calibration_windows, eval_windows, read_text, shakespeare, strip_markdown
from lowbit.data.corpus import play_ids
from lowbit.errors import LowbitError


def test_strip_markdown_golden():
    md = "# Othello\n\n## ACT I\n\n_Enter RODERIGO and IAGO_\n\n**RODERIGO**  \nTush! never tell me;  \nThat thou, Iago\n\n\n\nEnd"
    assert strip_markdown(md) == ("Othello\n\nACT I\n\nEnter RODERIGO and IAGO\n\nRODERIGO\n"
                                  "Tush! never tell me;\nThat thou, Iago\n\nEnd\n")


def test_corpus_splits_are_disjoint_and_cover_all_plays():
    ids = play_ids()
    assert len(ids) >= 36 and set(EVAL_PLAYS) <= set(ids)
    ev, cal = shakespeare("eval"), shakespeare("calib")
    assert 0.08 < len(ev) / (len(ev) + len(cal)) < 0.25
    assert "Twelfth Night" in ev and "Twelfth Night" not in cal   # an eval play's title
    assert "Hamlet" in cal.splitlines() and "**" not in cal and "\n_Enter" not in cal


def test_read_text_files_and_folders(tmp_path):
    (tmp_path / "b.md").write_text("**KING**  \nHail!\n")
    (tmp_path / "a.txt").write_text("plain *text*")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert read_text(str(tmp_path / "a.txt")) == "plain *text*"
    assert read_text(str(tmp_path / "b.md")) == "KING\nHail!\n"
    assert read_text(str(tmp_path / "c.jsonl")) == "one\n\ntwo"
    assert read_text(str(tmp_path)) == "plain *text*\n\nKING\nHail!\n\n\none\n\ntwo"
    assert read_text("default", split="eval") == shakespeare("eval")


def test_read_text_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(LowbitError, match="bad.jsonl' line 2: not valid JSON"):
        read_text(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(LowbitError, match="nofield.jsonl' line 1: no string field 'text'"):
        read_text(str(nofield))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match="latin.txt' is not UTF-8"):
        read_text(str(latin))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="has no"):
        read_text(str(tmp_path / "empty"))
    with pytest.raises(LowbitError, match="not found"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(LowbitError, match="no-such-dataset-xyz"):
        read_text("no-such-dataset-xyz:cfg:test")


def test_calibration_windows_deterministic_private_rng():
    ids = torch.arange(1000)
    state = torch.random.get_rng_state()
    a = calibration_windows(ids, 5, 16, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a, calibration_windows(ids, 5, 16, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 5, 16, seed=4))
    assert a.shape == (5, 16)
    assert torch.equal(a - a[:, :1], torch.arange(16).expand(5, 16))  # contiguous slices
    assert calibration_windows(torch.arange(16), 2, 16, 0).tolist() == [list(range(16))] * 2


def test_calibration_window_errors():
    with pytest.raises(LowbitError, match="10 tokens, fewer than one window of --seqlen 16"):
        calibration_windows(torch.arange(10), 4, 16, 0)
    with pytest.raises(LowbitError, match="--nsamples"):
        calibration_windows(torch.arange(100), 0, 16, 0)


def test_eval_windows_protocol():
    ids = torch.arange(10)
    assert eval_windows(ids, 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, 4).tolist() == [[0, 1, 2, 3]]
    assert eval_windows(ids, 4, None, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(LowbitError, match="fewer than one window"):
        eval_windows(torch.arange(3), 4, None)
    with pytest.raises(LowbitError, match="--max-tokens 2"):
        eval_windows(ids, 4, 2)
