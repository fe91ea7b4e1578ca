#!/usr/bin/env python3
"""Writes the small seed corpora in fuzz/corpus/<target>/ (committed; rerun to regenerate).

Seeds are built here by hand from the format specs (docs/formats.md §1 safetensors, §2 GGUF), with
no third-party packages, so they do not depend on our own writer:
  gguf          a header with one value of every metadata type and arrays; a micro Gemma 3
                (1 layer, hidden 4, 10-token SentencePiece vocabulary) that Checkpoint::open
                loads completely; a two-tensor file with F16/BF16 data
  safetensors   F32/BF16 tensors with __metadata__; an F8_E4M3 weight with per-channel
                weight_scale and input_scale (the compressed-tensors layout)
  hf_config     tests/data/tiny/config.json, a sparse multimodal (Gemma3ForConditionalGeneration)
                config, a compressed-tensors quantization_config
  tokenizer     mode byte + text (plain/special), mode byte + tests/data/tiny/tokenizer.model
  chat_template flags byte + role-byte-prefixed messages separated by NUL
  image         tiny PNG (RGB, RGBA, 16-bit gray, palette+tRNS, gray+alpha, Adam7), JPEG
                (baseline 4:2:0, progressive, gray), BMP (24/32-bit, 8-bit palette) and GIF
                (one frame; two frames with transparency), written by Pillow (skipped without it)
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- GGUF (docs/formats.md §2) ------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
          U64: "<Q", I64: "<q", F64: "<d"}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gval(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, x) for x in items)
    return struct.pack(SCALAR[t], v)


GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
ELEM = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}


def gguf(kvs, tensors, align=32):
    """kvs: [(key, type, value)]; tensors: [(name, ne, ggml_type, bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += gstr(k) + struct.pack("<I", t) + gval(t, v)
    offset = 0
    data = b""
    for name, ne, typ, raw in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        out += struct.pack("<IQ", typ, offset)
        data += raw + b"\0" * ((-len(raw)) % align)
        offset = len(data)
    out += b"\0" * ((-len(out)) % align)
    return out + data


def f32s(vals):
    return b"".join(struct.pack("<f", v) for v in vals)


def tensor(name, ne, typ=GGML_F32, fill=0.25):
    n = 1
    for x in ne:
        n *= x
    if typ == GGML_F32:
        raw = f32s([fill + 0.01 * i for i in range(n)])
    elif typ == GGML_F16:
        raw = struct.pack("<H", 0x3C00) * n  # 1.0
    else:
        raw = struct.pack("<H", 0x3F80) * n  # bf16 1.0
    return (name, ne, typ, raw)


def micro_gemma3():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\u2581", "a", "b",
              "\u2581a"]
    types = [3, 3, 3, 2, 3, 3, 1, 1, 1, 1]  # no BYTE pieces: SentencePiece wants all 256 or none
    H, I, HD, V = 4, 4, 2, len(tokens)
    kvs = [
        ("general.architecture", STR, "gemma3"),
        ("general.name", STR, "micro"),
        ("gemma3.block_count", U32, 1),
        ("gemma3.embedding_length", U32, H),
        ("gemma3.feed_forward_length", U32, I),
        ("gemma3.attention.head_count", U32, 1),
        ("gemma3.attention.head_count_kv", U32, 1),
        ("gemma3.attention.key_length", U32, HD),
        ("gemma3.attention.value_length", U32, HD),
        ("gemma3.context_length", U32, 32),
        ("gemma3.attention.sliding_window", U32, 4),
        ("gemma3.attention.layer_norm_rms_epsilon", F32, 1e-6),
        ("gemma3.rope.freq_base", F32, 1e6),
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 6 + [-1.0, -2.0, -3.0, 0.0])),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 2),
        ("tokenizer.ggml.eos_token_id", U32, 1),
        ("tokenizer.ggml.unknown_token_id", U32, 3),
    ]
    ts = [tensor("token_embd.weight", [H, V]), tensor("output_norm.weight", [H])]
    p = "blk.0."
    ts += [tensor(p + "attn_norm.weight", [H]),
           tensor(p + "attn_q.weight", [H, HD], GGML_F16),
           tensor(p + "attn_k.weight", [H, HD], GGML_BF16),
           tensor(p + "attn_v.weight", [H, HD]),
           tensor(p + "attn_q_norm.weight", [HD]),
           tensor(p + "attn_k_norm.weight", [HD]),
           tensor(p + "attn_output.weight", [HD, H]),
           tensor(p + "post_attention_norm.weight", [H]),
           tensor(p + "ffn_norm.weight", [H]),
           tensor(p + "ffn_gate.weight", [H, I]),
           tensor(p + "ffn_up.weight", [H, I]),
           tensor(p + "ffn_down.weight", [I, H]),
           tensor(p + "post_ffw_norm.weight", [H])]
    return gguf(kvs, ts)


def all_types():
    kvs = [("u8", U8, 7), ("i8", I8, -7), ("u16", U16, 700), ("i16", I16, -700), ("u32", U32, 70000),
           ("i32", I32, -70000), ("f32", F32, 1.5), ("bool", BOOL, True), ("str", STR, "h\u00e9llo"),
           ("u64", U64, 1 << 40), ("i64", I64, -(1 << 40)), ("f64", F64, 2.25),
           ("arr.str", ARR, (STR, ["a", "", "\u2581b"])), ("arr.i32", ARR, (I32, [1, -2, 3])),
           ("arr.bool", ARR, (BOOL, [True, False])), ("arr.f32", ARR, (F32, [0.5, -1.0])),
           ("arr.u64", ARR, (U64, [1, 2])), ("general.alignment", U32, 64)]
    return gguf(kvs, [tensor("t.f16", [4, 2], GGML_F16), tensor("t.bf16", [2], GGML_BF16)], align=64)


put("gguf", "micro_gemma3.gguf", micro_gemma3())
put("gguf", "all_types.gguf", all_types())
put("gguf", "empty.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))


# ---- safetensors (docs/formats.md §1.2) ---------------------------------------------------
def safetensors(entries, metadata=None):
    """entries: [(name, dtype, shape, raw bytes)] in data order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "f32_bf16.safetensors",
    safetensors([("model.embed_tokens.weight", "F32", [2, 3], f32s([1, 2, 3, 4, 5, 6])),
                 ("model.norm.weight", "BF16", [3], struct.pack("<H", 0x3F80) * 3),
                 ("scalar", "F16", [], struct.pack("<H", 0x3C00))], {"format": "pt"}))
put("safetensors", "fp8_channel.safetensors",
    safetensors([("layers.0.mlp.up_proj.weight", "F8_E4M3", [2, 4], bytes([0x38, 0x40, 0xB8, 0x00] * 2)),
                 ("layers.0.mlp.up_proj.weight_scale", "F32", [2, 1], f32s([0.5, 2.0])),
                 ("layers.0.mlp.up_proj.input_scale", "F32", [1], f32s([1.0])),
                 ("layers.0.mlp.down_proj.weight", "F8_E4M3", [1, 2], bytes([0x38, 0x38])),
                 ("layers.0.mlp.down_proj.weight_scale", "BF16", [], struct.pack("<H", 0x3F80))]))
put("safetensors", "empty.safetensors", safetensors([]))

# ---- config.json --------------------------------------------------------------------------
with open(os.path.join(ROOT, "tests/data/tiny/config.json"), "rb") as f:
    put("hf_config", "tiny_config.json", f.read())
put("hf_config", "multimodal_sparse.json", json.dumps({
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "eos_token_id": [1, 106], "mm_tokens_per_image": 256,
    "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024, "sliding_window_pattern": 6},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}},
    indent=1).encode())
put("hf_config", "fp8_quantized.json", json.dumps({
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "vocab_size": 262144, "sliding_window": 512, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "layer_types": ["sliding_attention"] * 5 + ["full_attention"] +
    ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
    "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                            "quantization_status": "compressed", "ignore": ["lm_head", "re:.*vision.*"],
                            "config_groups": {"group_0": {"targets": ["Linear"],
                                                          "weights": {"num_bits": 8, "type": "float",
                                                                      "strategy": "channel", "symmetric": True,
                                                                      "group_size": None},
                                                          "input_activations": {"dynamic": True}}}}},
    indent=1).encode())

# ---- tokenizer / chat template ------------------------------------------------------------
put("tokenizer", "plain_ascii", b"\x00Hello, world! The year is 2025.\n\tTabs  and   spaces.")
put("tokenizer", "plain_utf8", "\x00caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u0645\u0631\u062d\u0628\u0627".encode())
put("tokenizer", "special_turns", b"\x01<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
put("tokenizer", "special_partial", b"\x01<start_of_tur <end_of_turn <unused12> <unk><pad><eos>")
with open(os.path.join(ROOT, "tests/data/tiny/tokenizer.model"), "rb") as f:
    model = f.read()
put("tokenizer", "proto_parse.model", b"\x02" + model)
put("tokenizer", "proto_load.model", b"\x03" + model)

put("chat_template", "two_turns", b"\x03\x00Hello\x00\x01Hi there\x00\x00How are you?")
put("chat_template", "system_first", b"\x01\x03Be brief.\x00\x00  What is 2+2?  \n")
put("chat_template", "continuation", b"\x02\x00next question \xe2\x80\x83\x00\x02answer\x00\x00<end_of_turn>")
# ---- images (Pillow writes them: an independent encoder) -----------------------------------
try:
    import io
    from PIL import Image
except ImportError:
    Image = None
    print("Pillow missing: image seeds not written")
if Image is not None:
    def img_bytes(im, fmt, **kw):
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    def grad(w, h, mode="RGB"):
        im = Image.new("RGB", (w, h))
        im.putdata([((x * 40) % 256, (y * 60) % 256, (x * y * 13) % 256) for y in range(h) for x in range(w)])
        return im.convert(mode)

    put("image", "rgb_8x6.png", img_bytes(grad(8, 6), "PNG"))
    put("image", "rgba_5x4.png", img_bytes(grad(5, 4, "RGBA"), "PNG"))
    put("image", "gray16_4x4.png", img_bytes(grad(4, 4, "L").convert("I;16"), "PNG"))
    put("image", "pal_trns_6x3.png", img_bytes(grad(6, 3).quantize(colors=4), "PNG", transparency=1))
    put("image", "la_3x5.png", img_bytes(grad(3, 5, "LA"), "PNG"))
    put("image", "adam7_9x9.png", img_bytes(grad(9, 9), "PNG", interlace=1))
    put("image", "baseline_16x8.jpg", img_bytes(grad(16, 8), "JPEG", quality=80, subsampling=2))
    put("image", "progressive_16x16.jpg", img_bytes(grad(16, 16), "JPEG", quality=70, progressive=True))
    put("image", "gray_8x8.jpg", img_bytes(grad(8, 8, "L"), "JPEG"))
    put("image", "rgb_5x3.bmp", img_bytes(grad(5, 3), "BMP"))
    put("image", "rgba_4x2.bmp", img_bytes(grad(4, 2, "RGBA"), "BMP"))
    put("image", "pal_7x3.bmp", img_bytes(grad(7, 3).quantize(colors=8), "BMP"))
    put("image", "one_6x4.gif", img_bytes(grad(6, 4).quantize(colors=8), "GIF"))
    put("image", "two_frames_5x5.gif", img_bytes(grad(5, 5).quantize(colors=8), "GIF", save_all=True,
                                                append_images=[grad(5, 5).rotate(90).quantize(colors=8)],
                                                transparency=2, duration=50))
print("seeds written to", OUT)
