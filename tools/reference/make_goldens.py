#!/usr/bin/env python3
"""Golden outputs for the engine's numerical tests, computed with HF transformers in float32,
eager attention, no KV cache.  Writes tests/data/goldens/manifest.json + raw little-endian
float32 arrays (row-major).  See tools/reference/README.md for the format and tolerances.

Cases
  tiny_long            BOS + 39 pseudo-random ids (T=40 > sliding window 8: local layers wrap)
  tiny_text            BOS + tiny-tokenizer ids of a short English sentence
  tiny_offset_40000    6 ids at positions 40000..40005 (RoPE at large positions)
  tiny_offset_100000   6 ids at positions 100000..100005
  tiny_long_q8_0       tiny_long on the weights of tests/data/tiny-q8_0.gguf (dequantized)
  real270m_france      BOS + "The capital of France is"            (gemma-3-270m Q4_K_M, dequantized)
  real270m_chat        "<bos><start_of_turn>user\\nWhat is 2+2?<end_of_turn>\\n<start_of_turn>model\\n"

Embedding scale: Gemma multiplies the embedding by sqrt(H) *rounded to the weight dtype*
(HF: embed_scale.to(weight.dtype)); the real checkpoints are bf16, so the effective scale is
bf16(sqrt(H)) (25.25 for the 270M). Our engine always uses that bf16-rounded value. A float32
HF model would use the unrounded sqrt(H) instead, so this script overwrites the model's
embed_scale buffer with bf16(sqrt(H)) explicitly (tiny: bf16(sqrt(96)) = 9.8125).

Every HF result is cross-checked against an independent float64 numpy implementation of the
Gemma 3 forward pass written from the spec (np_forward below); the script fails if they
disagree, so the goldens do not silently depend on HF's mask/cache/position plumbing.

Usage:  python tools/reference/make_goldens.py [--skip-270m] [--gguf-270m PATH]
"""

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "data"))
sys.path.insert(0, HERE)

from convert_tiny_to_gguf import gguf_to_hf_name  # noqa: E402

DEFAULT_270M = os.path.join(os.path.expanduser("~"), ".cache", "gemma3", "gemma-3-270m-q4_k_m.gguf")

STOP_IDS = [1, 106]  # <eos>, <end_of_turn>
TINY_TEXT = "The old ferryman crossed the river at 7:45 and waved to the children. Café!"
CHAT_TEXT = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"


def bf16_scale(h):
    import torch

    return float(torch.tensor(math.sqrt(h), dtype=torch.float32).to(torch.bfloat16).float())


def set_embed_scale(model, value):
    import torch

    emb = model.model.embed_tokens
    emb.scalar_embed_scale = value
    with torch.no_grad():
        emb.embed_scale.copy_(torch.tensor(value, dtype=emb.embed_scale.dtype))
    assert float(emb.embed_scale) == value


# ----------------------------------------------------------------------------------------------
# Independent numpy reference (float64; RoPE angles rounded like float32 torch does).


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _inv_freq_f32(base, hd, factor):
    # float32 like HF: 1 / base ** (arange(0, hd, 2) / hd), then / factor for linear scaling.
    exps = (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)).astype(np.float32)
    inv = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)
    return (inv / np.float32(factor)).astype(np.float32)


def _rope(x, pos, inv_freq, f32_angles=True):
    # x [T, n, hd]; rotate-half over the whole head; angle = f32(pos * inv_freq) as HF computes it
    # (f32_angles=False: exact float64 angles, to measure how much that rounding matters).
    if f32_angles:
        ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32).astype(np.float64)
    else:
        ang = pos.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos = np.cos(np.concatenate([ang, ang], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], axis=-1))[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def np_forward(w, c, tokens, positions, embed_scale, want_logits_rows=None, f32_angles=True):
    """w: HF-named float64 arrays (norm weights as stored, i.e. offset from 1); c: dict of
    hyperparameters. Returns embed [T,H], layer_out [L,T,H], final_norm [T,H], logits [T,V]."""
    tokens = np.asarray(tokens)
    pos = np.asarray(positions, dtype=np.int64)
    T, hd, nH, nKV = len(tokens), c["head_dim"], c["n_heads"], c["n_kv_heads"]
    E = w["model.embed_tokens.weight"]
    x = E[tokens].astype(np.float64) * embed_scale
    embed = x.copy()
    outs = []
    eps = c["eps"]
    scale = c["query_pre_attn_scalar"] ** -0.5
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        is_global = (i + 1) % 6 == 0
        if is_global:
            inv = _inv_freq_f32(c["theta_global"], hd, c["factor_global"])
        else:
            inv = _inv_freq_f32(c["theta_local"], hd, 1.0)
        a = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nH, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nKV, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nKV, hd)
        q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], eps), pos, inv, f32_angles)
        k = _rope(_rms(k, w[p + "self_attn.k_norm.weight"], eps), pos, inv, f32_angles)
        # mask by absolute positions: key j visible to query i iff pos_j <= pos_i (and, on local
        # layers, pos_i - pos_j < W)
        d = pos[:, None] - pos[None, :]
        vis = d >= 0
        if not is_global:
            vis &= d < c["window"]
        o = np.zeros((T, nH, hd))
        G = nH // nKV
        for h in range(nH):
            s = (q[:, h, :] @ k[:, h // G, :].T) * scale
            s = np.where(vis, s, -np.inf)
            s = s - s.max(axis=1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=1, keepdims=True)
            o[:, h, :] = pr @ v[:, h // G, :]
        a = o.reshape(T, nH * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = x + _rms(a, w[p + "post_attention_layernorm.weight"], eps)
        m = _rms(x, w[p + "pre_feedforward_layernorm.weight"], eps)
        g = m @ w[p + "mlp.gate_proj.weight"].T
        u = m @ w[p + "mlp.up_proj.weight"].T
        m = (_gelu_tanh(g) * u) @ w[p + "mlp.down_proj.weight"].T
        x = x + _rms(m, w[p + "post_feedforward_layernorm.weight"], eps)
        outs.append(x.copy())
    fin = _rms(x, w["model.norm.weight"], eps)
    rows = fin if want_logits_rows is None else fin[want_logits_rows]
    logits = np.concatenate([rows @ E[j:j + 65536].astype(np.float64).T for j in range(0, E.shape[0], 65536)], axis=1)
    return dict(embed=embed, layer_out=np.stack(outs), final_norm=fin, logits=logits)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----------------------------------------------------------------------------------------------
# HF runs


def hf_run(model, tokens, positions):
    """float32 forward, no cache, explicit position_ids; hooks capture every layer output."""
    import torch

    caught = {}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: caught.__setitem__("embed", o)),
             model.model.norm.register_forward_hook(lambda m, i, o: caught.__setitem__("final_norm", o))]
    layer_outs = [None] * len(model.model.layers)
    for li, layer in enumerate(model.model.layers):
        def hook(m, i, o, li=li):
            layer_outs[li] = o[0] if isinstance(o, tuple) else o
        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            ids = torch.tensor([tokens], dtype=torch.long)
            pos = torch.tensor([positions], dtype=torch.long)
            out = model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return dict(
        logits=out.logits[0].float().numpy(),
        layer_out=torch.stack([t[0] for t in layer_outs]).float().numpy(),
        embed=caught["embed"][0].float().numpy(),
        final_norm=caught["final_norm"][0].float().numpy(),
    )


def hyper_from_hf(cfg):
    rp = cfg.rope_parameters
    return dict(
        n_layers=cfg.num_hidden_layers, head_dim=cfg.head_dim, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps, window=cfg.sliding_window,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        theta_global=rp["full_attention"]["rope_theta"], theta_local=rp["sliding_attention"]["rope_theta"],
        factor_global=rp["full_attention"].get("factor", 1.0) if rp["full_attention"]["rope_type"] == "linear" else 1.0,
    )


def check_rotary(model, c):
    rot = model.model.rotary_emb
    hd = c["head_dim"]
    g = rot.full_attention_inv_freq.numpy()
    l = rot.sliding_attention_inv_freq.numpy()
    assert np.allclose(g, _inv_freq_f32(c["theta_global"], hd, c["factor_global"]), rtol=1e-6, atol=0)
    assert np.allclose(l, _inv_freq_f32(c["theta_local"], hd, 1.0), rtol=1e-6, atol=0)
    return (int(np.sum(g != _inv_freq_f32(c["theta_global"], hd, c["factor_global"]))),
            int(np.sum(l != _inv_freq_f32(c["theta_local"], hd, 1.0))))


class Writer:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.bytes = 0

    def array(self, name, arr):
        arr = np.ascontiguousarray(arr, dtype="<f4")
        path = os.path.join(self.out_dir, name)
        arr.tofile(path)
        self.bytes += arr.nbytes
        return {"file": name, "shape": list(arr.shape)}


def tiny_cases(writer, log):
    import torch
    import sentencepiece as spm
    from transformers import Gemma3ForCausalLM

    tiny_dir = os.path.join(DATA, "tiny")
    model = Gemma3ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    H = cfg.hidden_size
    scale = bf16_scale(H)
    assert scale == 9.8125, scale
    set_embed_scale(model, scale)
    c = hyper_from_hf(cfg)
    assert c["factor_global"] == 8.0 and c["theta_local"] == 1e4 and c["query_pre_attn_scalar"] == 24
    ulps = check_rotary(model, c)
    log(f"tiny: rotary inv_freq checked (global /8, local unscaled); entries differing from numpy f32: {ulps}")

    from safetensors.torch import load_file
    w64 = {k: v.double().numpy() for k, v in load_file(os.path.join(tiny_dir, "model.safetensors")).items()}

    sp = spm.SentencePieceProcessor(model_file=os.path.join(tiny_dir, "tokenizer.model"))
    rng = np.random.Generator(np.random.PCG64(12345))
    long_ids = [2] + [int(t) for t in rng.integers(3, cfg.vocab_size, size=39)]
    text_ids = [2] + sp.encode(TINY_TEXT)
    assert sp.decode(text_ids[1:]) == TINY_TEXT
    off_ids = [2] + [int(t) for t in rng.integers(3, cfg.vocab_size, size=5)]

    specs = [
        ("tiny_long", long_ids, list(range(len(long_ids))), "40 ids > window 8: every local layer's window slides"),
        ("tiny_text", text_ids, list(range(len(text_ids))), f"BOS + tiny tokenizer ids of {TINY_TEXT!r}"),
        ("tiny_offset_40000", off_ids, list(range(40000, 40006)), "positions 40000..40005 (past 32K)"),
        ("tiny_offset_100000", off_ids, list(range(100000, 100006)), "positions 100000..100005"),
    ]
    cases = []
    for name, toks, pos, note in specs:
        hf = hf_run(model, toks, pos)
        ref = np_forward(w64, c, toks, pos, scale)
        errs = {k: rel_err(hf[k], ref[k]) for k in ("embed", "layer_out", "final_norm", "logits")}
        # fp32 vs fp64 with f32-emulated RoPE angles: expect ~1e-6; fail loudly above 1e-4.
        assert all(e < 1e-4 for e in errs.values()), (name, errs)
        rms = np.sqrt(np.mean(hf["layer_out"] ** 2, axis=(1, 2)))
        assert np.all((rms > 0.2) & (rms < 50)), (name, rms)  # activations stay O(1)
        log(f"{name}: T={len(toks)} HF vs numpy max rel err {max(errs.values()):.2e}; "
            f"layer rms {' '.join(f'{v:.2f}' for v in rms)}; logits std {hf['logits'].std():.2f}")
        cases.append(dict(
            name=name, model="tiny", note=note, tokens=toks, positions=pos,
            arrays={k: writer.array(f"{name}.{k}.f32", hf[k]) for k in ("logits", "layer_out", "embed", "final_norm")},
            argmax=[int(a) for a in hf["logits"].argmax(axis=1)],
            check_vs_numpy_f64_max_rel_err=max(errs.values()),
        ))

    # RoPE and the masks are relative, so the offset cases equal the same ids at positions 0..5
    # up to the float32 rounding of the angles pos * inv_freq. Record how close, for the README.
    base = hf_run(model, off_ids, list(range(6)))["logits"]
    for p0 in (40000, 100000):
        a = np.fromfile(os.path.join(writer.out_dir, f"tiny_offset_{p0}.logits.f32"), "<f4").reshape(base.shape)
        exact = np_forward(w64, c, off_ids, list(range(p0, p0 + 6)), scale, f32_angles=False)["logits"]
        log(f"tiny_offset_{p0}: max |logits - logits(same ids at positions 0..5)| = {np.max(np.abs(a - base)):.3g}; "
            f"max |logits - float64-angle RoPE| = {np.max(np.abs(a - exact)):.3g}")

    # The Q8_0 GGUF's weights, dequantized, in the same HF model.
    import gguf
    r = gguf.GGUFReader(os.path.join(DATA, "tiny-q8_0.gguf"))
    sd = {}
    for t in r.tensors:
        hfname = gguf_to_hf_name(t.name)
        shape = tuple(reversed([int(x) for x in t.shape]))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if hfname.endswith("norm.weight"):
            arr = arr - np.float32(1.0)  # exact: values were w + 1 in f32 with |w| small
        sd[hfname] = torch.from_numpy(arr.copy())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    set_embed_scale(model, scale)
    w64q = {k: v.numpy().astype(np.float64) for k, v in sd.items()}
    hf = hf_run(model, long_ids, list(range(len(long_ids))))
    ref = np_forward(w64q, c, long_ids, list(range(len(long_ids))), scale)
    errs = {k: rel_err(hf[k], ref[k]) for k in ("embed", "layer_out", "final_norm", "logits")}
    assert all(e < 1e-4 for e in errs.values()), errs
    f32_logits = np.fromfile(os.path.join(writer.out_dir, "tiny_long.logits.f32"), "<f4").reshape(hf["logits"].shape)
    log(f"tiny_long_q8_0: HF vs numpy {max(errs.values()):.2e}; max |q8 - f32 logits| = "
        f"{np.max(np.abs(hf['logits'] - f32_logits)):.3g}, argmax agreement "
        f"{np.mean(hf['logits'].argmax(1) == f32_logits.argmax(1)):.2f}")
    cases.append(dict(
        name="tiny_long_q8_0", model="tiny-q8_0",
        note="tiny_long tokens on the dequantized weights of tiny-q8_0.gguf (norms: stored value - 1)",
        tokens=long_ids, positions=list(range(len(long_ids))),
        arrays={k: writer.array(f"tiny_long_q8_0.{k}.f32", hf[k]) for k in ("logits", "layer_out", "embed", "final_norm")},
        argmax=[int(a) for a in hf["logits"].argmax(axis=1)],
        check_vs_numpy_f64_max_rel_err=max(errs.values()),
    ))
    model_info = dict(
        files=["tiny/model.safetensors", "tiny/config.json", "tiny/tokenizer.model", "tiny-f32.gguf", "tiny-q8_0.gguf"],
        embed_scale=scale, attention_scale=24 ** -0.5, hidden=H, layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size,
    )
    return cases, model_info, sp


def load_270m(path):
    """Dequantizes the GGUF into HF-named float32 arrays (norms: stored - 1) + metadata."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()
            if k.startswith(("gemma3.", "general.")) and not k.startswith("general.tags")}
    sd = {}
    types = {}
    for t in r.tensors:
        hfname = gguf_to_hf_name(t.name)
        shape = tuple(reversed([int(x) for x in t.shape]))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        if hfname.endswith("norm.weight"):
            arr = arr - np.float32(1.0)
        sd[hfname] = np.ascontiguousarray(arr)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return sd, meta, types


def real_cases(writer, log, gguf_path, gemma_tok):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sd, meta, types = load_270m(gguf_path)
    log(f"270m: {gguf_path}: {len(sd)} tensors, types {types}")
    L = meta["gemma3.block_count"]
    V, H = sd["model.embed_tokens.weight"].shape
    want = dict(L=18, H=640, I=2048, nH=4, nKV=1, hd=256, W=512, V=262144)
    got = dict(L=L, H=H, I=meta["gemma3.feed_forward_length"], nH=meta["gemma3.attention.head_count"],
               nKV=meta["gemma3.attention.head_count_kv"], hd=meta["gemma3.attention.key_length"],
               W=meta["gemma3.attention.sliding_window"], V=V)
    assert got == want, (got, want)
    assert "gemma3.rope.scaling.type" not in meta
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(L)]
    cfg = Gemma3TextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=got["I"], num_hidden_layers=L,
        num_attention_heads=got["nH"], num_key_value_heads=got["nKV"], head_dim=got["hd"],
        query_pre_attn_scalar=256, sliding_window=got["W"], max_position_embeddings=32768,
        rms_norm_eps=1e-6, layer_types=layer_types, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": float(meta["gemma3.rope.freq_base"])},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, eos_token_id=STOP_IDS, bos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)  # HF's random init is overwritten by load_state_dict below
    model = Gemma3ForCausalLM(cfg).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    scale = bf16_scale(H)
    assert scale == 25.25
    set_embed_scale(model, scale)
    c = hyper_from_hf(cfg)
    check_rotary(model, c)
    assert model.config._attn_implementation == "eager"

    w64 = {k: (v.astype(np.float64) if k != "model.embed_tokens.weight" else v) for k, v in sd.items()}

    france = [2] + gemma_tok.encode("The capital of France is", add_special_tokens=False).ids
    chat = [2] + gemma_tok.encode(CHAT_TEXT, add_special_tokens=False).ids
    assert chat[:4] == [2, 105, 2364, 107], chat  # <bos><start_of_turn>user\n (docs/architecture.md §4.2)
    assert chat.count(106) == 1 and chat[-3:] == [105, 4368, 107], chat  # ...<start_of_turn>model\n
    cases = []
    for name, toks, text in (("real270m_france", france, "The capital of France is"),
                             ("real270m_chat", chat, "<bos>" + CHAT_TEXT)):
        T = len(toks)
        pos = list(range(T))
        hf = hf_run(model, toks, pos)
        logits = hf["logits"]
        ref = np_forward(w64, c, toks, pos, scale, want_logits_rows=[T - 1])
        err_last = rel_err(logits[-1], ref["logits"][0])
        err_layers = rel_err(hf["layer_out"], ref["layer_out"])
        assert err_last < 1e-4 and err_layers < 1e-4, (name, err_last, err_layers)
        top_v, top_i = torch.topk(torch.from_numpy(logits), 20, dim=-1)

        # Greedy continuation, no cache: recompute the whole sequence each step (independent of
        # HF's cache code); stop after a stop id.
        seq = list(toks)
        greedy, margins = [], []
        for _ in range(16):
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1).logits[0, -1]
            nxt = int(lg.argmax())
            top2 = torch.topk(lg, 2).values
            margins.append(float(top2[0] - top2[1]))  # how safe an exact-match test of this step is
            greedy.append(nxt)
            seq.append(nxt)
            if nxt in STOP_IDS:
                break
        # Cross-check with generate() (KV cache path).
        with torch.no_grad():
            gen = model.generate(torch.tensor([toks]), do_sample=False, max_new_tokens=16,
                                 eos_token_id=STOP_IDS, pad_token_id=0)[0, T:].tolist()
        if gen != greedy:
            log(f"{name}: WARNING generate() {gen} != no-cache greedy {greedy}")
        text_out = gemma_tok.decode(greedy, skip_special_tokens=True)
        log(f"{name}: T={T} ids={toks}; HF vs numpy last-logits {err_last:.2e}, layers {err_layers:.2e}; "
            f"last logits in [{logits[-1].min():.2f}, {logits[-1].max():.2f}], max |logit| over all positions "
            f"{np.abs(logits).max():.2f}; greedy {greedy} margins {' '.join(f'{m:.2f}' for m in margins)} "
            f"-> {text_out!r}")
        cases.append(dict(
            name=name, model="270m", prompt=text, tokens=toks, positions=pos,
            arrays={"last_logits": writer.array(f"{name}.last_logits.f32", logits[-1])},
            top20_ids=top_i.tolist(), top20_logits=[[float(x) for x in row] for row in top_v.tolist()],
            greedy_ids=greedy, greedy_margins=margins, greedy_text=text_out,
            greedy_text_with_specials=gemma_tok.decode(greedy, skip_special_tokens=False),
            greedy_matches_generate=(gen == greedy),
            check_vs_numpy_f64_max_rel_err=max(err_last, err_layers),
        ))
    with open(gguf_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    info = dict(file=os.path.basename(gguf_path), where="$HOME/.cache/gemma3/ (not committed)", sha256=sha,
                tensor_types=types, embed_scale=scale, attention_scale=256 ** -0.5, stop_ids=STOP_IDS,
                note="weights = gguf.quants.dequantize of every tensor (norms minus 1), run in float32")
    return cases, info


def tokenizer_cases(sp, gemma_tok):
    out = []
    tiny_texts = [TINY_TEXT, "Hello world", "  two  spaces\tand a tab", "2024 was 366 days", "naïve café 日本 🙂"]
    for t in tiny_texts:
        out.append(dict(tokenizer="tiny", text=t, ids=sp.encode(t), special_tokens_parsed=False))
    if gemma_tok is not None:
        for t in ["The capital of France is", "Hello world", "  two  spaces\n\nnewlines\tand a tab",
                  "2024 was 366 days", "naïve café 日本語 🙂", CHAT_TEXT]:
            out.append(dict(tokenizer="gemma3", text=t, ids=gemma_tok.encode(t, add_special_tokens=False).ids,
                            special_tokens_parsed=True))
    return out


def versions():
    import gguf  # noqa: F401
    import sentencepiece
    import tokenizers
    import torch
    import transformers
    from importlib.metadata import version

    return dict(python=sys.version.split()[0], numpy=np.__version__, torch=torch.__version__,
                transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                sentencepiece=sentencepiece.__version__, gguf=version("gguf"),
                script="tools/reference/make_goldens.py", attn_implementation="eager", dtype="float32",
                kv_cache=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(DATA, "goldens"))
    ap.add_argument("--gguf-270m", default=DEFAULT_270M)
    ap.add_argument("--skip-270m", action="store_true")
    ap.add_argument("--gemma-tokenizer-json", default=os.environ.get("GEMMA3_TOKENIZER_JSON", ""),
                    help="the published Gemma 3 tokenizer.json (or $GEMMA3_TOKENIZER_JSON)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    writer = Writer(args.out)
    cases, tiny_info, sp = tiny_cases(writer, log)
    models = {"tiny": tiny_info, "tiny-q8_0": {"files": ["tiny-q8_0.gguf"], "embed_scale": tiny_info["embed_scale"]}}

    gemma_tok = None
    if args.gemma_tokenizer_json and os.path.exists(args.gemma_tokenizer_json):
        from tokenizers import Tokenizer
        gemma_tok = Tokenizer.from_file(args.gemma_tokenizer_json)
    if not args.skip_270m:
        if not os.path.exists(args.gguf_270m):
            sys.exit(f"missing {args.gguf_270m} (use --skip-270m to write only the tiny cases)")
        if gemma_tok is None:
            sys.exit(f"missing the Gemma 3 tokenizer.json {args.gemma_tokenizer_json!r}: pass "
                     "--gemma-tokenizer-json PATH or set GEMMA3_TOKENIZER_JSON")
        rc, info = real_cases(writer, log, args.gguf_270m, gemma_tok)
        cases += rc
        models["270m"] = info
        france = next(c for c in rc if c["name"] == "real270m_france")
        log(f"SANITY: 270m greedy continuation of 'The capital of France is' = {france['greedy_text']!r}; "
            f"contains 'Paris': {'Paris' in france['greedy_text']}")

    manifest = dict(
        format="raw little-endian float32, row-major; shapes in 'shape'; files relative to this directory",
        generator=versions(), models=models, cases=cases,
        tokenizer_cases=tokenizer_cases(sp, gemma_tok), log=lines,
    )
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}/manifest.json, {len(cases)} cases, {writer.bytes} bytes of arrays")


if __name__ == "__main__":
    main()
