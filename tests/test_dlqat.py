"""DL-QAT: trainable set and gradients, trainable fraction, exact export, training lowers the loss,
checkpoints (save/load, training state, resume), determinism, global RNG, and bad settings."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.config import CalibConfig, QuantConfig
from lowbit.errors import LowbitError
from lowbit.models.arch import resolve_spec
from lowbit.models.sources import load_model
from lowbit.packed.qlinear import QuantLinear
from lowbit.qat import FakeQuantLinear, QATConfig, initial_solution
from lowbit.qat.export import export, trainable_fraction, trainable_params, unique_param_count, wrap
from lowbit.qat.fakequant import RoundSTE
from lowbit.solvers import rtn
from lowbit.qat.train import lm_loss, lr_factor, train

from helpers import make_tokenizer

QUANT = QuantConfig(method="dlqat", bits=3, group_size=32)
CALIB = CalibConfig(nsamples=8, seqlen=64, seed=0)


def wrapped(path, text, qat=QATConfig(steps=4, lora_rank=4, batch_size=2), quant=QUANT, calib=None):
    """(model with FakeQuantLinear layers, modules, tokenizer, spec) of the tiny model at ``path``."""
    calib = calib or CalibConfig(source=str(text), nsamples=8, seqlen=64)
    model, tok, _ = load_model(str(path))
    spec = resolve_spec(model)
    inits = initial_solution(model, tok, spec, quant, calib, qat, "cpu")
    return model, wrap(model, spec, inits, qat.lora_rank, qat.seed), tok, spec


def text_ids(tok, text, n=4, t=64):
    return torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"][:n * t]).view(n, t)


def test_ste_and_fake_quant_at_init_is_the_initial_solution(tiny_models, tiny_text):
    x = torch.tensor([0.4, 0.6, -1.5], requires_grad=True)
    RoundSTE.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    model, modules, _, _ = wrapped(tiny_models["llama"], tiny_text)
    fp, _, _ = load_model(str(tiny_models["llama"]))
    for name, mod in modules.items():  # B = 0, m = 1: Ŵ is RTN of the float weight
        W = fp.get_submodule(name).weight.detach()
        ref = rtn.solve(W, None, QuantConfig(method="rtn", bits=3, group_size=32))[0]
        assert torch.equal(mod.quantized()[0], ref.dequantize())


def test_gradients_reach_only_magnitudes_and_lora(tiny_models, tiny_text):
    model, modules, tok, _ = wrapped(tiny_models["qwen2"], tiny_text)  # qwen2: q/k/v have biases
    params = trainable_params(modules)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    mod = next(iter(modules.values()))
    with torch.no_grad():
        mod.lora_b.normal_(0, 0.01, generator=torch.Generator().manual_seed(3))  # B = 0 would leave A's grad 0
    lm_loss(model, text_ids(tok, tiny_text)).backward()
    ours = {id(p) for p in params.values()}
    assert all(p.grad is not None for p in params.values())
    for m in modules.values():  # ∂L/∂A = Bᵀ(…) is 0 while B = 0, except in the layer whose B was set
        assert m.magnitude.grad.abs().sum() > 0 and m.lora_b.grad.abs().sum() > 0
        assert (m.lora_a.grad.abs().sum() > 0) == (m is mod)
    for name, p in model.named_parameters():
        if id(p) not in ours:
            assert p.grad is None and not p.requires_grad, name
    for name, b in model.named_buffers():
        assert not b.requires_grad, name


def test_trainable_fraction_formula_and_below_one_percent(tmp_path, tiny_text):
    import transformers as tf

    from transformers import AutoModelForCausalLM

    path = tmp_path / "wide"  # hidden 512, one block: wide enough for m·G + r(m + n) < 1 % of the model
    tok = make_tokenizer(tiny_text.read_text())
    tok.save_pretrained(path)
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    quant = QuantConfig(method="dlqat", bits=3, group_size=256)
    model, modules, _, _ = wrapped(path, tiny_text, QATConfig(lora_rank=1), quant)
    P = 160 * 512 + 4 * 512 * 512 + 3 * 512 * 1024 + 3 * 512  # embeddings (tied) + linears + 3 norms
    shapes = [(512, 512)] * 4 + [(1024, 512)] * 2 + [(512, 1024)]
    expect = sum(m * (n // 256) + 1 * (m + n) for m, n in shapes) / P
    frac = trainable_fraction(modules, P)
    assert frac == pytest.approx(expect) and frac < 0.01
    fp, _, _ = load_model(str(path))
    assert unique_param_count(fp) == P


@pytest.mark.e2e
def test_export_equals_fake_quant_and_checkpoint_round_trip(tiny_models, tiny_text, tmp_path):
    qat = QATConfig(steps=3, lora_rank=4, batch_size=2, lr=0.02)
    model, modules, tok, spec = wrapped(tiny_models["llama"], tiny_text, qat)
    ids = text_ids(tok, tiny_text)
    train(model, trainable_params(modules), text_ids(tok, tiny_text, 40).flatten(), qat, 64, "cpu", progress=False)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    results = export(model, modules)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in results)
    assert sum(r[1]["codes_changed"] for r in results.values()) > 0  # training moved some codes
    with torch.no_grad():
        exported = model(input_ids=ids).logits
    assert torch.equal(fake, exported)  # bit-identical: same codes, same fp16 scales
    # through the public API: saved, loaded, equal
    res = lowbit.quantize(str(tiny_models["llama"]), method="dlqat", bits=3, group_size=32, source=str(tiny_text),
                          seqlen=64, out=tmp_path / "q", progress=False, qat=qat)
    assert res.meta["qat"]["steps"] == 3 and res.meta["qat"]["w0"] == "original float weights"
    for key in ("trainable_fraction", "train_loss_first", "train_loss_last", "train_seconds"):
        assert isinstance(res.report[key], float), key
    loaded, _, meta = lowbit.load(tmp_path / "q", device="cpu")
    assert meta["method"] == "dlqat" and all(l["kind"] == "int" for l in meta["layers"].values())
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(saved) == 14
    for name, mod in loaded.named_modules():
        if isinstance(mod, QuantLinear):
            for k, t in mod.packed.tensors().items():
                assert torch.equal(t, saved[name].packed.tensors()[k]), (name, k)
    with torch.no_grad():
        a, b = res.model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=1e-2)  # embeddings/norms are stored in fp16


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.e2e
def test_training_lowers_the_loss(tiny_models, tiny_text, distill):
    qat = QATConfig(steps=25, lora_rank=4, batch_size=4, lr=0.01, distill=distill)
    model, modules, tok, _ = wrapped(tiny_models["llama"], tiny_text, qat)
    teacher, _, _ = load_model(str(tiny_models["llama"])) if distill else (None, 0, 0)
    ids = text_ids(tok, tiny_text, 60).flatten()
    fixed = ids[:8 * 64].view(8, 64)
    with torch.no_grad():
        before = float(lm_loss(model, fixed, teacher))
    stats = train(model, trainable_params(modules), ids, qat, 64, "cpu", teacher=teacher, progress=False)
    with torch.no_grad():
        after = float(lm_loss(model, fixed, teacher))
    assert after < 0.9 * before, (before, after)
    assert sum(stats["losses"][-5:]) < sum(stats["losses"][:5])


def test_gptq_init_starts_at_gptq(tiny_models, tiny_text, tmp_path):
    calib = CalibConfig(source=str(tiny_text), nsamples=8, seqlen=64)
    model, modules, tok, spec = wrapped(tiny_models["llama"], tiny_text, QATConfig(init="gptq"), calib=calib)
    ref = lowbit.quantize(str(tiny_models["llama"]), method="gptq", bits=3, group_size=32, source=str(tiny_text),
                          nsamples=8, seqlen=64, progress=False, out=tmp_path / "gptq")
    _, from_dir, _, _ = wrapped(tiny_models["llama"], tiny_text, QATConfig(init=str(tmp_path / "gptq")), calib=calib)
    for name, mod in modules.items():
        codes = ref.model.get_submodule(name).packed.codes()
        assert torch.equal(mod.base_codes(), codes) and torch.equal(from_dir[name].base_codes(), codes)
        assert torch.equal(mod.quantized()[0], ref.model.get_submodule(name).packed.dequantize())
    with pytest.raises(LowbitError, match="not a 4-bit"):
        wrapped(tiny_models["llama"], tiny_text, QATConfig(init=str(tmp_path / "gptq")),
                QuantConfig(method="dlqat", bits=4, group_size=32))


@pytest.mark.e2e
def test_deterministic_global_rng_untouched_and_resume(tiny_models, tiny_text, tmp_path, monkeypatch):
    src = str(tiny_models["llama"])
    kw = dict(method="dlqat", bits=3, group_size=32, source=str(tiny_text), seqlen=64, progress=False)
    state = torch.random.get_rng_state()
    full = lowbit.quantize(src, qat=QATConfig(steps=4, lora_rank=2, batch_size=2, lr=0.01), **kw)
    assert torch.equal(state, torch.random.get_rng_state())
    again = lowbit.quantize(src, qat=QATConfig(steps=4, lora_rank=2, batch_size=2, lr=0.01), **kw)
    assert full.report["train_losses"] == again.report["train_losses"]
    # 2 steps saved, then resumed to 4: the same run as 4 steps in one go
    part = QATConfig(steps=4, lora_rank=2, batch_size=2, lr=0.01, save_every=2)
    import lowbit.qat.train as tr

    real = tr.save_state

    def stop_after_first(*a, **k):  # the run is "killed" right after its first checkpoint
        real(*a, **k)
        raise KeyboardInterrupt
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(tr, "save_state", stop_after_first)
        lowbit.quantize(src, out=tmp_path / "r", qat=part, **kw)
    assert [p.name for p in (tmp_path / "r.work").iterdir()] == ["step_000002.safetensors"]
    with pytest.raises(LowbitError, match="different DL-QAT settings"):  # trained for 3 bits, not 4
        lowbit.quantize(src, out=tmp_path / "r", qat=dataclasses.replace(part, resume=True), **{**kw, "bits": 4})
    resumed = lowbit.quantize(src, out=tmp_path / "r", qat=dataclasses.replace(part, resume=True), **kw)
    assert resumed.report["resumed_from"] == 2
    assert resumed.report["train_losses"] == pytest.approx(full.report["train_losses"], rel=1e-5)
    a = {n: m.packed.codes() for n, m in full.model.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m.packed.codes() for n, m in resumed.model.named_modules() if isinstance(m, QuantLinear)}
    assert sum(int((a[n] != b[n]).sum()) for n in a) <= 2  # float-summation order may flip a tie


def test_lr_schedule():
    assert lr_factor(0, 100, 5) == pytest.approx(0.2) and lr_factor(4, 100, 5) == 1.0
    assert lr_factor(5, 100, 5) == 1.0 and lr_factor(99, 100, 5) < 0.01


@pytest.mark.parametrize("kw, flag", [(dict(steps=0), "--steps"), (dict(lora_rank=0), "--lora-rank"),
                                      (dict(lr=-1.0), "--lr"), (dict(init="awq"), "--init"),
                                      (dict(warmup=500), "--warmup"), (dict(grad_accum=0), "--grad-accum")])
def test_bad_settings(kw, flag):
    with pytest.raises(LowbitError, match=flag) as e:
        QATConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, needle", [(["--method", "dlqat", "--steps", "0"], "--steps 0"),
                                          (["--method", "gptq", "--lora-rank", "4"], "only to --method dlqat"),
                                          (["--method", "dlqat", "--resume"], "needs --out")])
@pytest.mark.e2e
def test_cli_errors_are_one_line(tiny_models, args, needle):
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(tiny_models["llama"]), *args, "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
