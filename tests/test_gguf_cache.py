"""The float copies a GGUF load keeps (``$LOWBIT_CACHE/gguf``) stay under ``$LOWBIT_GGUF_CACHE_GB``: the least
recently used go first, a hit counts as a use, 0 keeps none, a bad value is a one-line error."""
from __future__ import annotations

import os

import pytest
import torch

import lowbit
from helpers import run_cli
from lowbit.errors import LowbitError
from lowbit.export import export_gguf
from lowbit.models.sources import gguf_cache_limit, load_model, prune_gguf_cache


def _entry(root, name, nbytes, mtime):
    d = root / "gguf" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * nbytes)
    os.utime(d, (mtime, mtime))
    return d


def test_prune_drops_least_recently_used_first_and_the_kept_one_last(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    a, b, c = (_entry(tmp_path, n, 100, t) for n, t in (("a", 1000), ("b", 3000), ("c", 2000)))
    (tmp_path / "gguf" / ".tmp-x").mkdir()  # another process's copy in progress: not touched
    assert prune_gguf_cache(250, keep=a) == [c]  # a is the oldest but kept; c is older than b
    assert prune_gguf_cache(250) == [] and a.is_dir() and b.is_dir()
    assert prune_gguf_cache(150, keep=b) == [a]
    assert prune_gguf_cache(50, keep=b) == [b]  # larger than the limit on its own: not kept either
    assert (tmp_path / "gguf" / ".tmp-x").is_dir()


@pytest.mark.parametrize("raw, want", [("4", 4_000_000_000), ("0.5", 500_000_000), ("0", 0)])
def test_limit_from_the_environment(monkeypatch, raw, want):
    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", raw)
    assert gguf_cache_limit() == want


@pytest.mark.parametrize("raw", ["lots", "-1", "inf", "nan"])
def test_bad_limit_is_one_line_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", raw)
    with pytest.raises(LowbitError, match="LOWBIT_GGUF_CACHE_GB"):
        gguf_cache_limit()


@pytest.mark.e2e
def test_loads_keep_a_copy_within_the_limit(tiny_models, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "q"
    lowbit.quantize(str(tiny_models["llama"]), method="rtn", bits=4, group_size=32, out=ckpt, progress=False)
    files = []
    for i in range(2):
        files.append(tmp_path / f"m{i}.gguf")
        export_gguf(ckpt, files[-1])
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    copies = lambda: sorted(p.parent.name.split("-")[0] for p in (tmp_path / "cache").rglob("config.json"))  # noqa: E731

    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", "lots")  # the CLI: one line naming the variable, exit 2
    code, err = run_cli(capsys, "eval", str(files[0]), "--seqlen", "16", "--max-tokens", "32")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in err and "LOWBIT_GGUF_CACHE_GB='lots'" in lines[-1], err
    assert copies() == []

    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", "0")
    first, _, _ = load_model(str(files[0]))
    assert copies() == []

    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", "1")
    load_model(str(files[0]))
    load_model(str(files[1]))
    assert copies() == ["m0", "m1"]
    one = next((tmp_path / "cache" / "gguf").glob("m0-*"))
    size = sum(f.stat().st_size for f in one.iterdir())
    again, _, _ = load_model(str(files[0]))  # a hit: the same weights, and m0 becomes the most recent
    for (n, p), q in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n
    monkeypatch.setenv("LOWBIT_GGUF_CACHE_GB", str(1.5 * size / 1e9))
    prune_gguf_cache(gguf_cache_limit())
    assert copies() == ["m0"]  # m1 was the least recently used


def test_a_hit_is_newer_than_a_copy_written_in_the_same_clock_tick(tmp_path, monkeypatch):
    """File times tick coarsely: a copy written a moment before a hit can carry the same time as "now", so the
    touch goes just past the newest copy and the pruning order cannot tie (it did under load: m0 was pruned)."""
    import time

    from lowbit.models.sources import _touch

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    later = time.time() + 60  # "now" is not later than the other copies
    old = _entry(tmp_path, "old", 10, later)
    new = _entry(tmp_path, "new", 10, later)
    _touch(old)
    assert old.stat().st_mtime_ns > new.stat().st_mtime_ns
    assert prune_gguf_cache(15) == [new]
