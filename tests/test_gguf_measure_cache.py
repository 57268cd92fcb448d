"""``--target-bpw``'s measured errors are kept between runs (lowbit.gguf.measure_cache): a second budget on the same
model and calibration measures nothing (no float pass) and writes exactly the files a fresh measurement writes; any
change of model, text settings or candidates is a new key; a damaged cache is measured again."""
import json

import pytest
import torch
from helpers import build_wide

import lowbit
from lowbit.gguf import budget, measure_cache

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_wide(tmp_path_factory.mktemp("measure") / "m", "llama")


def quantize(wide, out, B, **kw):
    args = dict(method="gptq", target_bpw=B, source=str(wide / "calib.txt"), nsamples=8, seqlen=128,
                out=out, progress=False)
    lowbit.quantize(str(wide), **{**args, **kw})
    return json.loads((out / "lowbit.json").read_text())


def no_float_pass(*args, **kwargs):
    raise AssertionError("the float model was measured again")
    yield  # a generator, as budget.float_hessians is


def test_a_second_budget_reuses_the_measurement_and_writes_the_same_files(wide, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    first = quantize(wide, tmp_path / "a", 4.0)
    assert first["gguf_budget"]["measured_cached"] is False
    assert len(list((tmp_path / "cache" / "bpw-errors").glob("*.json"))) == 1
    with monkeypatch.context() as m:
        m.setattr(budget, "float_hessians", no_float_pass)
        second = quantize(wide, tmp_path / "b", 4.5)
    rec = second["gguf_budget"]
    assert rec["measured_cached"] is True and rec["measured"] == first["gguf_budget"]["measured"]
    assert rec["predicted_bpw"] <= 4.5 and rec["predicted_bpw"] > first["gguf_budget"]["predicted_bpw"]
    # a fresh measurement (another cache) at the same budget: the very same weights and plan
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "fresh"))
    fresh = quantize(wide, tmp_path / "c", 4.5)
    assert fresh["gguf_budget"]["measured_cached"] is False
    assert fresh["weights_sha256"] == second["weights_sha256"]
    assert {n: l["gguf_type"] for n, l in fresh["layers"].items()} == \
        {n: l["gguf_type"] for n, l in second["layers"].items()}
    for name in ("measured", "types", "predicted_bpw", "achieved_bpw"):
        assert fresh["gguf_budget"][name] == rec[name]


def test_other_settings_and_a_damaged_cache_measure_again(wide, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    base = quantize(wide, tmp_path / "a", 4.0)
    folder = tmp_path / "cache" / "bpw-errors"
    for i, kw in enumerate([dict(seed=1), dict(bpw_candidates="Q2_K,Q4_K,Q8_0"),
                            dict(method="rtn")]):
        got = quantize(wide, tmp_path / f"o{i}", 4.0, **kw)
        assert got["gguf_budget"]["measured_cached"] is False, kw
    assert len(list(folder.glob("*.json"))) == 4  # one key each
    # the same run again hits; then each damaged form of its file is measured again (and rewritten)
    key_file = max(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert quantize(wide, tmp_path / "rtn", 4.0, method="rtn")["gguf_budget"]["measured_cached"] is True
    good = json.loads(key_file.read_text())
    one = next(iter(good["measured"]))
    for damaged in ["not json", json.dumps({"measured": {one: good["measured"][one]}})]:
        key_file.write_text(damaged)
        got = quantize(wide, tmp_path / "rtn", 4.0, method="rtn", force=True)
        assert got["gguf_budget"]["measured_cached"] is False
        assert got["gguf_budget"]["measured"] == good["measured"]
    assert json.loads(key_file.read_text()) == good
    assert base["gguf_budget"]["measured_cached"] is False


def test_the_key_covers_the_weights_and_the_windows(wide):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(wide))
    opts = {"a": ["Q4_0", "Q8_0"]}
    w = torch.arange(20).reshape(2, 10)
    k = measure_cache.key(model, opts, True, 1024, w, ("torch.float32", 4, "cpu"))
    assert k == measure_cache.key(model, opts, True, 1024, w.clone(), ("torch.float32", 4, "cpu"))
    others = [measure_cache.key(model, opts, False, 1024, w, ("torch.float32", 4, "cpu")),
              measure_cache.key(model, opts, True, 512, w, ("torch.float32", 4, "cpu")),
              measure_cache.key(model, {"a": ["Q4_0"]}, True, 1024, w, ("torch.float32", 4, "cpu")),
              measure_cache.key(model, opts, True, 1024, w + 1, ("torch.float32", 4, "cpu")),
              measure_cache.key(model, opts, True, 1024, w, ("torch.bfloat16", 4, "cpu")),
              measure_cache.key(model, opts, True, 1024, None, ())]
    with torch.no_grad():
        p = next(model.parameters())
        p.view(-1)[0] += 1e-3
    others.append(measure_cache.key(model, opts, True, 1024, w, ("torch.float32", 4, "cpu")))
    assert len({k, *others}) == len(others) + 1
