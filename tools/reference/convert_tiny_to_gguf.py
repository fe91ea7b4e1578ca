#!/usr/bin/env python3
"""Converts tests/data/tiny (HF safetensors + tokenizer.model) to GGUF, the way llama.cpp's
convert_hf_to_gguf.py (class Gemma3Model) does it, using the `gguf` package's GGUFWriter.

Writes:
  tests/data/tiny-f32.gguf   every tensor F32
  tests/data/tiny-q8_0.gguf  2-D weights Q8_0 (token_embd included, gguf.quants.quantize),
                             1-D tensors (all norms) F32

Conventions reproduced (see docs/formats.md §2.6-2.8, §4):
  * general.architecture "gemma3", the gemma3.* hyperparameter keys, rope.freq_base = the
    global-layer base, rope.scaling.type "linear" + rope.scaling.factor (the global-layer
    scaling), attention.sliding_window. No local base key (llama.cpp hard-codes 10000).
  * tensor names token_embd / output_norm / blk.N.{attn_norm, attn_q, attn_k, attn_v,
    attn_output, attn_q_norm, attn_k_norm, post_attention_norm, ffn_norm, ffn_gate, ffn_up,
    ffn_down, post_ffw_norm}.weight; HF [out, in] bytes unchanged (GGUF ne = reversed shape);
    no lm_head (tied).
  * every *norm.weight is written as (w + 1) in F32 (computed in float32, like the converter
    and like HF's forward), so a GGUF reader must NOT add 1 again.
  * tokenizer.ggml.model "llama", tokens/scores/token_type from tokenizer.model in id order;
    types from SentencePiece (UNKNOWN/CONTROL/UNUSED/BYTE, else NORMAL) and then, as for
    Google's checkpoints whose tokenizer_config.json marks them special, <pad> <eos> <bos>
    <unk> and the control symbols are overridden to CONTROL with score -1000 (that is what
    the real Gemma 3 GGUFs contain: their first token types read 3,3,3,3,...).
    bos 2, eos 1, unk 3, padding 0, add_bos_token true, add_eos_token false,
    add_space_prefix false.

Extension (ours, not written by llama.cpp):
  gemma3.attention.query_pre_attn_scalar  UINT32  HF config query_pre_attn_scalar (24 here).
  A GGUF otherwise carries no attention scale: llama.cpp uses 1/sqrt(head_dim) except for the
  62-layer 27B (1/sqrt(H/nH)). The tiny model's scale is 24^-0.5, NOT 32^-0.5, so a reader
  that ignores this key computes different outputs -- on purpose.

After writing, both files are read back with gguf.GGUFReader and checked against the
safetensors (F32: bit-exact, norms +1; Q8_0: equal to gguf.quants.dequantize(quantize(w))).

Usage:  python tools/reference/convert_tiny_to_gguf.py [--model tests/data/tiny] [--out-dir tests/data]
"""

import argparse
import json
import os
import re

import numpy as np

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# HF tensor-name prefixes of the language model (text-only and both multimodal layouts).
PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def hf_to_gguf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    for p in PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise KeyError(f"no GGUF name for HF tensor {name!r}")
    return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"


def gguf_to_hf_name(name):
    inv = {v: k for k, v in GLOBAL_NAMES.items()}
    if name in inv:
        return inv[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)\.weight", name)
    inv_layer = {v: k for k, v in LAYER_NAMES.items()}
    if not m or m.group(2) not in inv_layer:
        raise KeyError(f"no HF name for GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}.weight"


def sentencepiece_vocab(model_path, special_pieces):
    """llama.cpp _create_vocab_sentencepiece + the added_tokens_decoder override for specials."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        tokens.append(piece.encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(t)
    for i in range(sp.get_piece_size()):
        if sp.id_to_piece(i) in special_pieces:
            types[i] = gguf.TokenType.CONTROL
            scores[i] = -1000.0
    return tokens, scores, types


SPECIAL_PIECES = {
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
}


def load_hf(model_dir):
    from safetensors import safe_open

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors = {}
    # torch framework so that bf16 files load too; values are upcast to float32 exactly.
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k).float().numpy()
    return cfg, tensors


def write_gguf(path, cfg, tensors, vocab, qtype):
    import gguf

    tokens, scores, types = vocab
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_type("model")
    w.add_name("Gemma3 Tiny Random")
    w.add_description("random-weight tiny Gemma 3 test model; generated by tools/reference")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                        else gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rp = cfg["rope_parameters"]
    w.add_rope_freq_base(rp["full_attention"]["rope_theta"])
    if rp["full_attention"].get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["full_attention"]["factor"])
    # The converter's RoPE data come from the global layers; the local layers must be plain.
    assert rp["sliding_attention"]["rope_type"] == "default"
    assert rp["sliding_attention"]["rope_theta"] == 10000.0, "llama.cpp hard-codes the local base"
    w.add_sliding_window(cfg["sliding_window"])
    # Our extension (see module docstring).
    w.add_uint32("gemma3.attention.query_pre_attn_scalar", int(cfg["query_pre_attn_scalar"]))

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    n_vocab = len(tokens)
    for name, arr in tensors.items():
        gname = hf_to_gguf_name(name)
        data = np.ascontiguousarray(arr, dtype=np.float32)
        if gname == "token_embd.weight":
            data = data[:n_vocab]  # converter drops rows beyond the tokenizer (none here)
        if name.endswith("norm.weight"):
            data = (data + np.float32(1.0)).astype(np.float32)
        if data.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gname, q, raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def field_value(reader, key):
    f = reader.fields[key]
    return f.contents()


def verify(path, cfg, tensors, vocab, qtype):
    import gguf

    r = gguf.GGUFReader(path)
    assert field_value(r, "general.architecture") == "gemma3"
    assert field_value(r, "gemma3.block_count") == cfg["num_hidden_layers"]
    assert field_value(r, "gemma3.embedding_length") == cfg["hidden_size"]
    assert field_value(r, "gemma3.attention.key_length") == cfg["head_dim"]
    assert field_value(r, "gemma3.attention.sliding_window") == cfg["sliding_window"]
    assert field_value(r, "gemma3.attention.query_pre_attn_scalar") == cfg["query_pre_attn_scalar"]
    assert field_value(r, "gemma3.rope.scaling.type") == "linear"
    assert field_value(r, "gemma3.rope.scaling.factor") == 8.0
    assert field_value(r, "gemma3.rope.freq_base") == 1e6
    assert field_value(r, "tokenizer.ggml.add_space_prefix") is False
    toks = field_value(r, "tokenizer.ggml.tokens")
    assert [t.encode() for t in toks] == vocab[0]
    assert list(field_value(r, "tokenizer.ggml.token_type")) == [int(t) for t in vocab[2]]
    assert len(r.tensors) == 2 + 13 * cfg["num_hidden_layers"], len(r.tensors)
    seen = set()
    max_q_err = 0.0
    for t in r.tensors:
        hf = gguf_to_hf_name(t.name)
        seen.add(hf)
        want = np.asarray(tensors[hf], dtype=np.float32)
        if hf.endswith("norm.weight"):
            want = want + np.float32(1.0)
        assert [int(x) for x in t.shape] == list(reversed(want.shape)), (t.name, t.shape, want.shape)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert np.array_equal(got, want), t.name
        else:
            assert t.tensor_type == qtype, t.name
            ref = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype).reshape(want.shape)
            assert np.array_equal(got, ref), t.name
            # Q8_0: d = amax/127 per 32-block, stored as f16: |err| <= d/2 + 127*|d - f16(d)|
            # <= d * (0.5 + 127 * 2^-11) < 0.57 d.
            blk = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(got - want).reshape(-1, 32)
            assert np.all(err <= blk / 127 * 0.57 + 1e-12), t.name
            max_q_err = max(max_q_err, float(err.max()))
    assert seen == set(tensors), sorted(set(tensors) ^ seen)
    return len(r.tensors), max_q_err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.normpath(os.path.join(here, "..", "..", "tests", "data"))
    ap.add_argument("--model", default=os.path.join(data, "tiny"))
    ap.add_argument("--out-dir", default=data)
    args = ap.parse_args()

    import gguf

    cfg, tensors = load_hf(args.model)
    vocab = sentencepiece_vocab(os.path.join(args.model, "tokenizer.model"), SPECIAL_PIECES)
    assert len(vocab[0]) == cfg["vocab_size"]
    for suffix, qtype in (("f32", gguf.GGMLQuantizationType.F32), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        path = os.path.join(args.out_dir, f"tiny-{suffix}.gguf")
        write_gguf(path, cfg, tensors, vocab, qtype)
        n, qerr = verify(path, cfg, tensors, vocab, qtype)
        print(f"wrote {path}: {n} tensors, {os.path.getsize(path)} bytes, read back OK"
              + (f" (max |q8_0 - f32| = {qerr:.3g})" if qerr else ""))


if __name__ == "__main__":
    main()
