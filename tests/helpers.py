"""Plain helpers the test modules import (``from helpers import …``); fixtures live in ``conftest.py``.

Tiny random-config models of every supported family saved as HF folders, the generated text they are
calibrated on, and small comparisons. No downloads: configs are built locally, weights are random (seeded),
the tokenizer is a small byte-level BPE trained on generated text.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair foul sweet "
         "speak hear see come go stay fly run and but or if not so yet thou thee thy my our your "
         "good ill true false gold iron stone fire water air earth sea land sky star moon sun").split()


def make_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(5, 10):
            lines.append(" ".join(line).capitalize() + rng.choice([",", ".", ";", "!", "?"]))
            line = []
    return "\n".join(lines) + "\n"


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def family_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=16,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "opt")


def build_tiny_model(family: str, path, text: str):
    tok = make_tokenizer(text)
    cfg = family_config(family, len(tok))
    model = random_model(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_model(cfg):
    """A causal LM of config ``cfg`` with seeded random weights (matrices ~ N(0, 0.08²), larger than the default
    so quantization error is visible), in eval mode; the caller's RNG state is left alone."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
    return model.eval()


def build_wide(path: Path, family: str, **overrides) -> Path:
    """A random 2-block model, hidden 256, MLP 512, byte-level BPE of 384 tokens (so it has merges, which
    llama.cpp needs); gemma3 with head_dim 256 = query_pre_attn_scalar, as llama.cpp's gemma3 graph assumes.
    ``overrides``: config fields set before the weights are drawn (``num_hidden_layers=8``,
    ``tie_word_embeddings=False``)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = make_text()
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = tf.Gemma3TextConfig(**common, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                  sliding_window=16)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = random_model(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "calib.txt").write_text(text)
    return path


def llama_cpp_bin(name: str) -> str | None:
    """``name`` from $LOWBIT_LLAMA_CPP_BIN, PATH, or a cached build under ~/.cache/llamacpp."""
    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    if env and (Path(env) / name).is_file():
        return str(Path(env) / name)
    found = shutil.which(name)
    if found:
        return found
    for p in sorted(Path.home().glob(f".cache/llamacpp/DL/*/vendor/llama.cpp/build/bin/{name}")):
        return str(p)
    return None


def llama_perplexity(gguf_path, text_path, ctx: int = 128) -> tuple[int, float]:
    """Run ``llama-perplexity`` on a GGUF file -> ``(k, ppl)``: its running estimate after ``k`` windows of ``ctx``
    tokens, ``"[k]ppl"`` (the log's tail can be lost at exit on a busy machine, so the last one printed)."""
    import math
    import re
    import subprocess

    r = subprocess.run([llama_cpp_bin("llama-perplexity"), "-m", str(gguf_path), "-f", str(text_path),
                        "-c", str(ctx), "-t", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    progress = re.findall(r"\[(\d+)\]([0-9.]+)", r.stdout + r.stderr)
    assert progress, (r.stdout + r.stderr)[-2000:]
    k, theirs = int(progress[-1][0]), float(progress[-1][1])
    assert k >= 8 and math.isfinite(theirs)
    return k, theirs


def down_proj_stats(path, text: str):
    """``(W, H)`` of block 1's down_proj of the model at ``path``, ``H = 2/n Σ xxᵀ`` from the inputs it
    really sees on 2048 tokens of ``text`` (8 windows of 256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:2048]).view(8, 256)
    lin = model.model.layers[1].mlp.down_proj
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    X = torch.cat(xs).float()
    return lin.weight.detach().clone(), 2 / X.shape[0] * X.T @ X


RUN_RECORD = "quantize"  # lowbit.json's record of one run (seconds, peak RSS, machine): differs between equal runs


def artifact_files(folder) -> dict:
    """``{name: bytes}`` of a checkpoint folder, ``lowbit.json`` without its run record (:data:`RUN_RECORD`),
    for the tests that require two runs to write the same files."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "lowbit.json":
            meta = json.loads(data)
            assert isinstance(meta.pop(RUN_RECORD, None), dict), "lowbit.json records the run"
            data = json.dumps(meta, sort_keys=True).encode()
        out[p.name] = data
    return out


def private_lowbit_cache(path):
    """A fresh ``$LOWBIT_CACHE`` folder at ``path`` for the float-model evaluations, sharing the real cache's
    compiled kernels and GGUF float copies (so tests that isolate the evaluations build neither again)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for shared in ("kernels", "gguf"):
        real = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit") / shared
        real.mkdir(parents=True, exist_ok=True)
        if not (path / shared).exists():
            (path / shared).symlink_to(real, target_is_directory=True)
    return path


def run_cli(capsys, *args):
    """``(exit code, stderr)`` of ``lowbit ARGS`` run in this process (``capsys``: pytest's capture fixture)."""
    from lowbit.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def random_weight(m, n, bits, gs, sym, g_idx=False, seed=0):
    """A random ``GroupQuantWeight`` ``(m, n)``: codes, scales (and zeros unless ``sym``) drawn from ``seed``;
    ``g_idx`` shuffles the columns' groups (act-order without static groups)."""
    from lowbit.packed.qweight import GroupQuantWeight

    gen = torch.Generator().manual_seed(seed)
    G = -(-n // gs)
    codes = torch.randint(0, 2 ** bits, (m, n), generator=gen)
    scales = torch.rand(m, G, generator=gen) * 0.05 + 0.005
    zeros = None if sym else torch.randint(0, 2 ** bits, (m, G), generator=gen).float()
    gi = torch.randperm(n, generator=gen) // gs if g_idx else None  # act-order without static groups
    return GroupQuantWeight.from_codes(codes, scales, zeros, bits, gs, g_idx=gi)
