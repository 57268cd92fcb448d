"""GGUF metadata for :mod:`lowbit.export.gguf`: architecture keys from config.json, tokenizer keys.

Architecture (``{arch}.`` prefix, llama.cpp names, read back by transformers' GGUF loader)::

    context_length ← max_position_embeddings    embedding_length ← hidden_size
    block_count ← num_hidden_layers             feed_forward_length ← intermediate_size
    attention.head_count(_kv) ← num_attention_heads / num_key_value_heads
    rope.freq_base ← rope_theta                 attention.layer_norm_rms_epsilon ← rms_norm_eps
    rope.dimension_count ← head_dim             vocab_size ← vocab_size
    attention.key_length/value_length ← head_dim (only when head_dim ≠ hidden/heads)
    rope.scaling.type/factor ← a "linear" rope scaling (others are refused)

Tokenizer (``tokenizer.`` prefix): a byte-level BPE ``tokenizer.json`` becomes ``ggml.model = gpt2``
with ``tokens`` in id order (ids missing from the vocabulary padded as ``[PADi]``, type UNUSED),
``token_type`` (1 normal, 3 control = special added token, 4 user-defined added token) and
``merges``; a sentencepiece-style BPE (byte fallback) becomes ``ggml.model = llama`` with scores, via
``gguf.vocab.LlamaHfVocab``.  ``bos/eos/unk/pad`` ids, ``add_bos/eos_token`` and the chat template come
from ``gguf.vocab.SpecialVocab``.  ``ggml.pre`` (llama.cpp's pre-tokenizer name) is copied from the
GGUF the checkpoint was quantized from when there is one, else ``default``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError

# transformers model_type -> (GGUF architecture, permute Q/K rows as llama.cpp does)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
         "gemma3_text": ("gemma3", False)}
NORM_PLUS_ONE = ("gemma3_text",)  # RMSNorm by (1 + w): llama.cpp's file holds 1 + w (convert_hf_to_gguf)
# families lowbit quantizes (models/arch.py) that are refused, and why
REFUSED = {"opt": "llama.cpp has no OPT architecture",
           "gemma3": "the multimodal Gemma3 (vision tower, model.language_model) is not exported; quantize the "
                     "text model (model_type gemma3_text, Gemma3ForCausalLM)"}


def check_arch(ck) -> str:
    """The checkpoint's model_type if GGUF export supports it, else a LowbitError naming the family and why."""
    model_type = ck.config.get("model_type")
    if model_type in REFUSED:
        raise LowbitError(f"{ck.path}: GGUF export of model type {model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in ARCHS:
        raise LowbitError(f"GGUF export supports model types {', '.join(sorted(ARCHS))}; '{ck.path}' is {model_type!r}")
    if model_type == "gemma3_text":
        _check_gemma3(ck)
    return model_type


def _check_gemma3(ck) -> None:
    """What llama.cpp's gemma3 graph assumes: attention scaled by 1/√head_dim, no attention soft-capping,
    every 6th layer global (the rest sliding-window)."""
    cfg = ck.config
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    n = int(cfg["num_hidden_layers"])
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    problems = []
    if int(cfg.get("query_pre_attn_scalar") or head_dim) != head_dim:
        problems.append(f"query_pre_attn_scalar {cfg.get('query_pre_attn_scalar')} != head_dim {head_dim}")
    if cfg.get("attn_logit_softcapping"):
        problems.append("attention logit soft-capping")
    if cfg.get("layer_types") and list(cfg["layer_types"]) != pattern:
        problems.append("layer_types other than every 6th layer global")
    if problems:
        raise LowbitError(f"{ck.path}: this gemma3 model cannot be written for llama.cpp's gemma3 graph: "
                          + "; ".join(problems))


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def add_model_metadata(w, ck, arch: str, fallback_name: str) -> None:
    """``general.*`` and ``{arch}.*`` keys from the checkpoint's config.json."""
    import gguf

    cfg = ck.config
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    source = ck.meta.get("source") or {}
    name = source.get("alias") or Path(str(source.get("source") or fallback_name)).name
    qc = ck.meta.get("config", {})
    grid = qc.get("gguf_type") or f"w{qc.get('bits', '?')}g{qc.get('group_size', '?')}"
    w.add_name(f"{name} lowbit {ck.meta.get('method', '')} {grid}".strip())
    w.add_quantized_by("lowbit")
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    theta, scaling = _rope(cfg)
    if arch == "gemma3":
        theta, scaling = _gemma3_keys(w, cfg, head_dim)
    w.add_rope_freq_base(theta)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise LowbitError(f"GGUF export: rope scaling {kind!r} is not supported (only 'linear')")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads and arch != "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _gemma3_keys(w, cfg: dict, head_dim: int) -> tuple[float, dict | None]:
    """Gemma3's extra keys (as convert_hf_to_gguf writes them) -> the global layers' rope base and scaling."""
    params = cfg.get("rope_parameters") or {}
    full = params.get("full_attention") or {"rope_theta": cfg.get("rope_theta", 1_000_000.0),
                                            **(cfg.get("rope_scaling") or {})}
    local = params.get("sliding_attention") or {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_rope_freq_base_swa(float(local.get("rope_theta", 10_000.0)))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    kind = full.get("rope_type", full.get("type", "default"))
    return float(full.get("rope_theta", 1_000_000.0)), (full if kind != "default" else None)


def _source_pre(ck) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF this checkpoint was quantized from, if it is still there."""
    src = ck.meta.get("source") or {}
    if src.get("kind") != "gguf" or not src.get("gguf_file"):
        return None
    path = Path(src.get("path", "")) / src["gguf_file"]
    if not path.is_file():
        return None
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        return None if field is None else field.contents()
    except Exception:  # an unreadable source only loses the pre-tokenizer name
        return None


def _bpe_tokens(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """Byte-level BPE: tokens in id order and their GGUF token types (as convert_hf_to_gguf does)."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    n = n_vocab or max(reverse) + 1  # ids past the embedding (e.g. a pad token added later) cannot be used
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(model: dict) -> list[str]:
    """BPE merges as "a b" strings; a space inside a part becomes U+0120 (chr(32 + 256)), as llama.cpp writes it."""
    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    return list(merges)


def add_tokenizer(w, ck) -> None:
    """``tokenizer.*`` keys for the checkpoint's tokenizer (see the module docstring)."""
    import gguf

    path = ck.path
    tj_path = path / "tokenizer.json"
    if not tj_path.is_file():
        raise LowbitError(f"GGUF export needs a fast tokenizer: {tj_path} is missing")
    try:
        tj = json.loads(tj_path.read_text())
        model = tj.get("model", {})
    except (OSError, ValueError) as e:
        raise LowbitError(f"{tj_path}: cannot read ({e})") from None
    n_vocab = int(ck.config.get("vocab_size") or 0)
    decoder = (tj.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many types for unreadable tokenizers
            raise LowbitError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})") from None
        tokens, types = _bpe_tokens(tok, n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_source_pre(ck) or "default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(path, load_merges=False, n_vocab=len(tokens))
        special.merges = _merges(model)
        ids = tok("a")["input_ids"]  # what the HF tokenizer adds around a text, unless the files say it
        special.add_special_token.setdefault("bos", bool(ids) and ids[0] == tok.bos_token_id)
        special.add_special_token.setdefault("eos", bool(ids) and ids[-1] == tok.eos_token_id)
        if not special.merges:  # GGUF has no empty arrays: scores let readers derive the (absent) merges
            w.add_token_scores([0.0] * len(tokens))
        special.add_to_gguf(w, quiet=True)
        return
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gguf.vocab.LlamaHfVocab(path)
        tokens, scores, types = zip(*vocab.all_tokens())
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        w.add_token_scores(list(scores))
        w.add_token_types([int(t) for t in types])
        gguf.SpecialVocab(path, load_merges=False, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        return
    raise LowbitError(f"{tj_path}: a {model.get('type')} tokenizer (decoder {decoder}) cannot be written to GGUF; "
                      f"supported: byte-level BPE, sentencepiece-style BPE with byte fallback")
