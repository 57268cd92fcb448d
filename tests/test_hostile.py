"""Hostile and broken inputs (issue 7, part 5), beyond tests/test_errors.py: each case ends in one clean line
``lowbit: error: …`` (or a :class:`LowbitError`) naming the culprit, never a traceback or a half-written output;
property tests throw random ``lowbit.json`` edits and packed tensors at the loaders."""
import errno
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import api
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.packed.qweight import FORMATS, FormatError, from_tensors

from helpers import run_cli

PROGRESS = ("Loading", "Writing", "Converting")  # transformers' progress bars (the GGUF one ignores --quiet)


def assert_clean(code, err, *needles):
    """Exit status 2 and exactly one line ``lowbit: error: …`` containing every needle; no traceback."""
    assert code == 2, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not l.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])

CALIB = ["--nsamples", "4", "--seqlen", "64", "--quiet"]


def edited_model(tiny_models, dst: Path, edit) -> Path:
    """A copy of the tiny llama model with ``edit(model)`` applied to its weights."""
    from transformers import AutoModelForCausalLM

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_weights_are_refused_before_quantizing(value, tiny_models, tiny_text, tmp_path, capsys, monkeypatch):
    def edit(m):
        m.model.layers[1].mlp.up_proj.weight[3, 5] = value

    src = edited_model(tiny_models, tmp_path / "m", edit)
    called = []
    monkeypatch.setattr(api, "_solve", lambda *a, **k: called.append(1))
    assert_clean(*run_cli(capsys, "quantize", str(src), "--calib", str(tiny_text), *CALIB, "--out", str(tmp_path / "q")),
                 "model.layers.1.mlp.up_proj.weight", "1 NaN/Inf value", "refusing to quantize")
    assert not called and not (tmp_path / "q").exists()


@pytest.mark.parametrize("method", ["gptq", "gwq", "squeeze", "quip"])
def test_all_zero_hessian_dead_inputs(method, tiny_models, tiny_text, tmp_path):
    """Zeroed norms make every input of block 0's q/k/v and block 1's gate/up zero, so ``H = 0``: those inputs
    are dead, the layers quantize to finite weights with zero proxy loss, and the result loads back."""
    def edit(m):
        m.model.layers[0].input_layernorm.weight.zero_()
        m.model.layers[1].post_attention_layernorm.weight.zero_()

    src = edited_model(tiny_models, tmp_path / "m", edit)
    res = lowbit.quantize(str(src), method=method, bits=2 if method == "quip" else 4, group_size=32,
                          source=str(tiny_text), nsamples=4, seqlen=64, grad_samples=2, progress=False,
                          out=tmp_path / "q")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        assert res.meta["layers"][name]["loss"] == 0.0
        assert torch.isfinite(res.model.get_submodule(name).packed.dequantize()).all()
    assert all(torch.isfinite(torch.tensor(l["loss"])) for l in res.meta["layers"].values())
    lowbit.load(tmp_path / "q", device="cpu")


def _indefinite(n: int, big: float) -> torch.Tensor:
    """``I`` plus a symmetric 2x2 off-diagonal pair ``big``: eigenvalues 1 ± big, mean diagonal 1."""
    H = torch.eye(n, dtype=torch.float64)
    H[0, 1] = H[1, 0] = big
    return H.float()


@pytest.mark.parametrize("method", ["gptq", "foem", "gwq", "squeeze", "quip"])
def test_non_positive_definite_hessian(method, tiny_models):
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method=method, bits=2 if method == "quip" else 4, group_size=32,
                      **({"saliency": "hessian"} if method == "gwq" else {}))
    # slightly indefinite (eigenvalue -0.001): the first damping retries repair it
    packed, info = api._solve(cfg, W, _indefinite(64, 1.001), "model.layers.0.mlp.down_proj")
    assert torch.isfinite(packed.dequantize()).all()
    # eigenvalue -999: no damping repairs it -> one clean error naming the layer and the flag to turn
    with pytest.raises(LowbitError) as e:
        api._solve(cfg, W, _indefinite(64, 1000.0), "model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "'model.layers.0.mlp.down_proj'" in msg and "not positive definite" in msg and "--damp" in msg
    assert "\n" not in msg
    packed, _ = api._solve(cfg, W, torch.zeros(64, 64), "model.layers.0.mlp.down_proj")  # every input dead
    assert torch.isfinite(packed.dequantize()).all()
    for H in (torch.full((64, 64), float("nan")), -torch.eye(64)):  # nothing usable at all
        with pytest.raises(LowbitError, match="down_proj.*no usable calibration signal"):
            api._solve(cfg, W, H, "model.layers.0.mlp.down_proj")


def test_zero_length_calibration_text(tiny_models, tmp_path, capsys):
    t = tmp_path / "zero.txt"
    t.write_bytes(b"")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(t), *CALIB), "zero.txt", "empty")
    j = tmp_path / "zero.jsonl"
    j.write_bytes(b"")
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(j), *CALIB), "zero.jsonl", "empty")


def _tiny_gguf(path: Path, qtype, arch: str = "llama") -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_token_merges([])
    w.add_token_types([1] * 8)
    size = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block of 32
    w.add_tensor("token_embd.weight", np.zeros((8, size), dtype=np.uint8), raw_shape=(8, size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_unsupported_tensor_type(tmp_path, capsys, monkeypatch):
    import gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    q81 = _tiny_gguf(tmp_path / "q81.gguf", gguf.GGMLQuantizationType.Q8_1)  # a real type nobody dequantizes
    assert_clean(*run_cli(capsys, "quantize", str(q81), "--quiet"), "q81.gguf", "Q8_1", "not yet implemented")
    data = bytearray(q81.read_bytes())  # a type id that does not exist: patch the tensor info's type field
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    j = i + 4 + 8 * int.from_bytes(data[i:i + 4], "little")
    assert int.from_bytes(data[j:j + 4], "little") == gguf.GGMLQuantizationType.Q8_1
    data[j:j + 4] = (99).to_bytes(4, "little")
    (tmp_path / "t99.gguf").write_bytes(bytes(data))
    assert_clean(*run_cli(capsys, "quantize", str(tmp_path / "t99.gguf"), "--quiet"), "t99.gguf", "99")
    arch = _tiny_gguf(tmp_path / "arch.gguf", gguf.GGMLQuantizationType.F32, arch="garbage-arch")
    assert_clean(*run_cli(capsys, "quantize", str(arch), "--quiet"), "arch.gguf", "garbage-arch", "not supported")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


@pytest.fixture(scope="module")
def ckpt(tiny_models, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("hck") / "q"
    lowbit.quantize(str(tiny_models["llama"]), bits=3, group_size=32, source=str(tiny_text), out=out, nsamples=4,
                    seqlen=64, progress=False)
    return out


def _header_len(f: Path) -> int:
    return 8 + int.from_bytes(f.read_bytes()[:8], "little")


@pytest.mark.parametrize("where", ["data", "header", "length"])
def test_bit_flipped_weights(where, broken, capsys):
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    offset = {"data": _header_len(f) + 1000, "header": 9, "length": 2}[where]
    data[offset] ^= 0x10
    f.write_bytes(bytes(data))
    assert_clean(*run_cli(capsys, "eval", str(broken), "--quiet"), "model.safetensors", "corrupt")


def test_lowbit_json_missing_keys_and_wrong_shapes(broken, capsys):
    meta = json.loads((broken / "lowbit.json").read_text())
    good = json.dumps(meta)
    cases = [
        (lambda m: m.pop("layers"), "missing or invalid 'layers'"),
        (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].pop("bits"), "up_proj"),
        (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(shape=[64, 96]), "up_proj"),
        (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(kind="float8"), "unknown packed format"),
        (lambda m: m["layers"].update({"model.layers.0.nope": m["layers"]["model.layers.0.mlp.up_proj"]}), "nope"),
        (lambda m: m.update(format_version="1"), "unknown format version '1'"),
    ]
    for edit, needle in cases:
        m = json.loads(good)
        edit(m)
        (broken / "lowbit.json").write_text(json.dumps(m))
        assert_clean(*run_cli(capsys, "eval", str(broken), "--quiet"), needle)


def test_read_only_output_directory(tiny_models, tiny_text, tmp_path, capsys, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse writes the way the kernel would
        real = tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **k):
            if dir is not None and Path(dir) == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    else:
        ro.chmod(0o555)
    called = []
    monkeypatch.setattr(api, "_solve", lambda *a, **k: called.append(1))
    try:
        assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(tiny_text), *CALIB,
                              "--out", str(ro / "q")), str(ro / "q"), "cannot write there", "Permission denied")
    finally:
        ro.chmod(0o755)
    assert not called and list(ro.iterdir()) == []  # it failed before any work, and left nothing


def _fail_when(monkeypatch, pattern: str, rust: bool = False):
    """Make safetensors' ``save_file`` fail with ENOSPC for files whose name contains ``pattern``: as an
    ``OSError``, or (``rust``) the way safetensors really reports a failed write, a ``SafetensorError``."""
    import os

    import safetensors.torch as sft
    from safetensors import SafetensorError

    real = sft.save_file

    def save_file(tensors, filename, *a, **k):
        if pattern in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # a disk that fills up mid-file
            if rust:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(sft, "save_file", save_file)
    return real


@pytest.mark.parametrize("rust", [False, True])
def test_disk_full_while_saving_the_output(rust, tiny_models, tiny_text, tmp_path, capsys, monkeypatch):
    real = _fail_when(monkeypatch, "model.safetensors", rust)
    argv = ["quantize", str(tiny_models["llama"]), "--calib", str(tiny_text), *CALIB, "--group-size", "32",
            "--out", str(tmp_path / "q")]
    assert_clean(*run_cli(capsys, *argv), str(tmp_path / "q"), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.work"]  # no output, no temporary folder
    import safetensors.torch as sft

    monkeypatch.setattr(sft, "save_file", real)  # space freed: --resume only writes the output, solves nothing
    solves = []
    orig = api._solve
    monkeypatch.setattr(api, "_solve", lambda *a, **k: solves.append(1) or orig(*a, **k))
    assert run_cli(capsys, *argv, "--resume")[0] == 0
    assert not solves and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    lowbit.load(tmp_path / "q", device="cpu")


@pytest.mark.parametrize("rust", [False, True])
def test_disk_full_while_writing_a_block_checkpoint(rust, tiny_models, tiny_text, tmp_path, capsys, monkeypatch):
    _fail_when(monkeypatch, "inputs_0001", rust)
    assert_clean(*run_cli(capsys, "quantize", str(tiny_models["llama"]), "--calib", str(tiny_text), *CALIB,
                          "--out", str(tmp_path / "q")), "inputs_0001.safetensors", "No space left on device")
    assert not (tmp_path / "q").exists()
    left = sorted(p.name for p in (tmp_path / "q.work" / "blocks").iterdir())  # block 0 committed, no temporaries
    assert left == ["block_0000.json", "block_0000.safetensors", "block_0001.safetensors", "inputs_0000.safetensors"]


# ---- property tests: random damage to lowbit.json and the packed tensors -------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)
TOP_KEYS = ["format", "format_version", "dtype", "method", "config", "layers", "bits_per_weight", "source"]
LAYER_KEYS = ["kind", "shape", "bits", "group_size", "sym", "g_idx", "nnz", "loss"]
DTYPES = [torch.int32, torch.int16, torch.int64, torch.uint8, torch.float16, torch.float32, torch.bool]


@st.composite
def json_damage(draw):
    """A list of edits ``(path, value or DELETE)`` to lowbit.json: top-level keys or keys of one layer."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            path = (draw(st.sampled_from(TOP_KEYS)),)
        else:
            path = ("layers", draw(st.integers(0, 13)), draw(st.sampled_from(LAYER_KEYS)))
        edits.append((path, draw(st.just("DELETE") | JSON)))
    return edits


@st.composite
def tensor_damage(draw):
    """``(packed tensor index, dtype, shape)``: one packed tensor replaced by one of another dtype and/or shape."""
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    return draw(st.integers(0, 40)), draw(st.sampled_from(DTYPES)), shape


def _apply_json(meta: dict, edits) -> dict:
    layers = list(meta["layers"]) if isinstance(meta.get("layers"), dict) else []
    for path, value in edits:
        target, key = meta, path[0]
        if len(path) == 3:  # a key of one layer
            if not layers or not isinstance(meta.get("layers"), dict):
                continue
            name = layers[path[1] % len(layers)]
            if not isinstance(meta["layers"].get(name), dict):
                continue
            target, key = meta["layers"][name], path[2]
        if value == "DELETE":
            target.pop(key, None)
        else:
            target[key] = value
    return meta


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def ckpt_logits(ckpt):
    return _logits(lowbit.load(ckpt, device="cpu")[0])


@SETTINGS
@given(edits=json_damage())
def test_fuzz_lowbit_json(ckpt, ckpt_logits, edits):
    """A damaged lowbit.json is refused in one line, or (an edit of what loading does not read) gives the same model."""
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "c"
        shutil.copytree(ckpt, dst)
        meta = _apply_json(json.loads((dst / "lowbit.json").read_text()), edits)
        (dst / "lowbit.json").write_text(json.dumps(meta))
        try:
            model = lowbit.load(dst, device="cpu")[0]
        except LowbitError as e:
            assert "\n" not in str(e)
            return
        assert torch.equal(_logits(model), ckpt_logits), edits


@SETTINGS
@given(damage=tensor_damage())
def test_fuzz_packed_tensors_in_checkpoint(ckpt, ckpt_logits, damage):
    from safetensors.torch import load_file, save_file

    index, dtype, shape = damage
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "c"
        shutil.copytree(ckpt, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        keys = sorted(tensors)
        key = keys[index % len(keys)]
        same_layout = tensors[key].dtype == dtype and tuple(tensors[key].shape) == shape
        tensors[key] = torch.zeros(shape, dtype=dtype) if dtype != torch.bool else torch.ones(shape, dtype=dtype)
        save_file(tensors, str(dst / "model.safetensors"))
        meta = json.loads((dst / "lowbit.json").read_text())
        meta.pop("weights_sha256", None)  # reach the structural checks, not just the checksum
        (dst / "lowbit.json").write_text(json.dumps(meta))
        try:
            model = lowbit.load(dst, device="cpu")[0]
        except LowbitError as e:
            assert "\n" not in str(e)
            return
        # loaded: only new values in the very layout of the old tensor can load (and change the outputs)
        assert same_layout or torch.equal(_logits(model), ckpt_logits), (key, dtype, shape)


# ---- property test: real packed weights of every format, damaged --------------------------------------------

@functools.cache
def real_packed() -> dict[str, object]:
    """``{label: packed weight}``: one or more real weights of every registered format, made by the solvers
    (40 x 64, so rows are not a multiple of 32 and groups of 32 split the columns)."""
    import dataclasses

    from lowbit.solvers import SOLVERS

    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H = X.T @ X / 256
    settings_by_label = {
        "int-asym": dict(method="rtn", bits=4, group_size=32),
        "int-sym-g_idx": dict(method="gptq", bits=3, group_size=32, sym=True, static_groups=False),
        "int+outliers": dict(method="gwq", bits=4, group_size=32, saliency="hessian"),
        "bin+int": dict(method="squeeze", group_size=32),
        "bin+int-residual": dict(method="squeeze", group_size=32, binary_residual=True),
        "quip-e8p-2bit": dict(method="quip", bits=2),
        "quip-e8p-3bit": dict(method="quip", bits=3),
        "quip-scalar-no-rht": dict(method="quip", bits=3, codebook="scalar", rht=False),
    }
    settings_by_label["gguf-q3_k"] = dict(method="rtn", gguf_type="Q3_K")  # GGUF-native blocks (rows of 256)
    out = {}
    for label, kw in settings_by_label.items():
        cfg = QuantConfig(**kw)
        if "gguf_type" in kw:
            from lowbit.gguf.solve import solve

            out[label] = solve(torch.randn(4, 256, generator=g) * 0.05, None, cfg)[0]
        else:
            out[label] = SOLVERS[cfg.method](W, None if kw["method"] == "rtn" else H, cfg)[0]
    su, sv = out["quip-e8p-2bit"].signs()  # fine-tuned QuIP# stores real fp16 signs
    out["quip-real-signs"] = dataclasses.replace(out["quip-e8p-2bit"], su=su.half(), sv=sv.half())
    return out


def test_every_format_has_real_fuzz_inputs():
    assert {p.kind for p in real_packed().values()} == set(FORMATS)
    for p in real_packed().values():  # and the undamaged ones load back exactly
        assert torch.equal(from_tensors(p.tensors(), p.meta()).dequantize(), p.dequantize())


HUGE = [2**31 - 1, -2**31, -1, 2**40]
INDEX_TENSORS = ("g_idx", "outlier_rowptr", "outlier_col")  # any out-of-range value is invalid
META_VALUES = st.one_of(JSON, st.sampled_from([0, -1, 2**31, 2**63, 10**30, True, False, None, "4", 4.0, 4.5,
                                               float("nan"), float("inf"), [40, 64], [64, 40], [40], {}, "int"]))


@st.composite
def damage(draw):
    """``(label, meta, tensors, what)``: a real packed weight with 1-3 of: a metadata key dropped or given another
    value (other types, huge, NaN), a tensor dropped, cast, reshaped, given NaN/∞ (floats) or out-of-range
    indices, or an extra tensor."""
    label = draw(st.sampled_from(sorted(real_packed())))
    p = real_packed()[label]
    meta, tensors, what = dict(p.meta()), dict(p.tensors()), []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop-meta", "set-meta", "drop", "cast", "reshape", "nonfinite", "index", "extra"]))
        if op in ("drop-meta", "set-meta"):
            key = draw(st.sampled_from(sorted(meta) + ["extra"]))
            if op == "drop-meta":
                meta.pop(key, None)
            else:
                meta[key] = draw(META_VALUES)
            what.append((op, key, meta.get(key)))
            continue
        if op == "extra":
            tensors[draw(st.sampled_from(["bias", "qzeros", "g_idx", "codes2", "qres", "p3", "su", "junk"]))] = \
                torch.zeros(3, dtype=torch.int32)
            what.append(op)
            continue
        if not tensors:
            continue
        key = draw(st.sampled_from(sorted(tensors)))
        t = tensors[key]
        if op == "drop":
            del tensors[key]
        elif op == "cast":
            tensors[key] = t.to(draw(st.sampled_from(DTYPES)))
        elif op == "reshape":
            how = draw(st.sampled_from(["flatten", "unsqueeze", "shorter", "longer", "transpose", "empty", "scalar"]))
            tensors[key] = {"flatten": lambda: t.flatten(), "unsqueeze": lambda: t.unsqueeze(0),
                            "shorter": lambda: t[..., :-1], "longer": lambda: torch.cat([t, t[..., :1]], -1),
                            "transpose": lambda: t.T if t.dim() == 2 and t.shape[0] != t.shape[1] else t.unsqueeze(-1),
                            "empty": lambda: t[..., :0], "scalar": lambda: t.flatten()[0]}[how]().contiguous()
            op = f"reshape-{how}"
        elif op == "nonfinite":
            if not t.is_floating_point():
                continue
            t = t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"),
                                                                                      float("-inf")]))
            tensors[key] = t
        elif op == "index":
            key = next((k for k in INDEX_TENSORS if k in tensors), None)
            if key is None:
                continue
            t = tensors[key].clone()
            value = draw(st.sampled_from(HUGE))
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = max(min(value, torch.iinfo(t.dtype).max),
                                                                  torch.iinfo(t.dtype).min)
            tensors[key] = t
        what.append((op, key))
    return label, meta, tensors, what


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=damage())
def test_fuzz_packed_format_loaders(case):
    """Every damaged real weight is either refused with one :class:`FormatError` line or loads as the very same
    weight (a harmless edit, e.g. a metadata key no loader reads): never a crash, never a different weight."""
    label, meta, tensors, what = case
    original = real_packed()[label]
    try:
        loaded = from_tensors(tensors, meta)
    except FormatError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert torch.equal(loaded.dequantize(), original.dequantize()), (label, what)
