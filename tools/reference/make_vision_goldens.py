#!/usr/bin/env python3
"""Builds the tiny random multimodal Gemma 3 in tests/data/tiny-vision/ and its goldens.

The reference is transformers' Gemma3ForConditionalGeneration (fp32, eager attention), fed
explicit pixel_values (no image processor) and explicit input_ids built the JAX way (see
docs/vision.md): each image is

    encode("\\n\\n") + [boi] + N x [image_token] + [eoi] + encode("\\n\\n")

with token_type_ids = 1 exactly at the N soft tokens, so HF applies its bidirectional image
groups. transformers 5.24 composes the masks as (create_masks_for_vision_model):
    global layers:  causal OR same-image
    sliding layers: (causal OR same-image) AND (key > query - sliding_window)
The sliding window here (8) is smaller than an image (16 soft tokens), so the AND matters.

Model (TINY_TEXT / TINY_VISION below): text like tests/data/tiny but smaller (6 layers: 0-4
local, 5 global; GQA 4/2, head_dim 16, query_pre_attn_scalar 24 != head_dim) with 520
embedding rows (512 tokenizer pieces + 8 padding rows, as the real 262208 vs 262144) and
<image_soft_token> = 512 (past the tokenizer, like the real 262144); the tokenizer is
tests/data/tiny/tokenizer.model, whose control pieces <start_of_image> = 6 and
<end_of_image> = 7 are the boi/eoi ids. Vision: SigLIP 64 px, patch 8 (8x8 = 64 patches),
hidden 48, 4 heads, MLP 96, 2 layers; mm_tokens_per_image 16 (pool 2x2).
Weights: numpy PCG64, rounded to bfloat16 and stored as bf16 (lossless), every norm/bias random.

Writes (tests/data/tiny-vision/):
  config.json, generation_config.json, model.safetensors, tokenizer.model   the HF folder
  text-bf16.gguf     the text model as llama.cpp's converter writes it (BF16 matrices, F32
                     norms holding 1 + w; token_embd cut to the 512 tokenizer rows)
  mmproj-bf16.gguf   the vision tower + projector as llama.cpp's mmproj (clip.* keys,
                     v.* / mm.* names; BF16 matrices, F32 vectors; patch conv [Hv,3,p,p];
                     mm.soft_emb_norm holds 1 + w; mm.input_projection keeps HF's [Hv, H]
                     bytes, i.e. GGUF ne [H, Hv])
  goldens.json       manifest: shapes, prompt ids, files below
  goldens/*.f32      raw little-endian float32:
      pixels          [2, 3, 64, 64]  the two images' pixel_values (uniform in [-1, 1])
      tower           [2, 64, 48]     vision_tower last_hidden_state (after post_layernorm)
      projected       [2, 16, 64]     multi_modal_projector output
      one_image.logits  [T1, 520]     logits at every position, prompt with image 0
      two_images.logits [T2, 520]     logits at every position, prompt with images 0 and 1
      one_image_causal.logits [T1, 520]  same prompt without token_type_ids (HF falls back to
                                      causal masks), to show the bidirectional groups matter
      e2e.last_logits [1, 520]        tests/data/images/rgb_300x90.png through Pillow and
                                      Gemma3ImageProcessorPil (64 px), prompt "What is" IMG "?"

Usage:  python tools/reference/make_vision_goldens.py [--out tests/data/tiny-vision]
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from convert_tiny_to_gguf import SPECIAL_PIECES, hf_to_gguf_name, sentencepiece_vocab  # noqa: E402

SEED = 20251127

TINY_TEXT = dict(
    vocab_size=520,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
TINY_VISION = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    num_channels=3,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)
MM_TOKENS = 16
BOI, EOI, IMAGE_TOKEN = 6, 7, 512
E2E_IMAGE = "rgb_300x90.png"
E2E_PROMPT = ["What is", 0, "?"]


def bf16_round(a):
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def make_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    t = TINY_TEXT
    text = Gemma3TextConfig(
        **t,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(t["num_hidden_layers"])],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        attention_bias=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = SiglipVisionConfig(**TINY_VISION)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                       boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE_TOKEN,
                       tie_word_embeddings=True)
    cfg.eos_token_id = [1, 5]
    cfg.bos_token_id = 2
    cfg.pad_token_id = 0
    return cfg


def init_weights(model, seed):
    import torch

    rng = np.random.Generator(np.random.PCG64(seed))
    H, I = TINY_TEXT["hidden_size"], TINY_TEXT["intermediate_size"]
    Hv, Iv = TINY_VISION["hidden_size"], TINY_VISION["intermediate_size"]
    qw = TINY_TEXT["num_attention_heads"] * TINY_TEXT["head_dim"]
    p = TINY_VISION["patch_size"]
    with torch.no_grad():
        for name, prm in model.named_parameters():
            shape = tuple(prm.shape)
            mean = 0.0
            if "vision_tower" in name:
                if "layer_norm" in name or "post_layernorm" in name:
                    mean, std = (1.0, 0.3) if name.endswith("weight") else (0.0, 0.3)
                elif name.endswith("bias"):
                    std = 0.1
                elif "patch_embedding" in name:
                    std = 1.0 / math.sqrt(3 * p * p)
                elif "position_embedding" in name:
                    std = 0.5
                elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight",
                                    "fc1.weight")):
                    std = 1.0 / math.sqrt(Hv)
                elif name.endswith("fc2.weight"):
                    std = 1.0 / math.sqrt(Iv)
                else:
                    raise RuntimeError(f"unexpected parameter {name}")
            elif "multi_modal_projector" in name:
                std = 0.3 if name.endswith("mm_soft_emb_norm.weight") else 1.0 / math.sqrt(Hv)
            elif name.endswith("norm.weight"):
                std = 0.3
            elif name.endswith("embed_tokens.weight"):
                std = 0.1
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                "up_proj.weight")):
                std = 1.0 / math.sqrt(H)
            elif name.endswith("o_proj.weight"):
                std = 1.0 / math.sqrt(qw)
            elif name.endswith("down_proj.weight"):
                std = 1.0 / math.sqrt(I)
            else:
                raise RuntimeError(f"unexpected parameter {name}")
            w = bf16_round(rng.normal(mean, std, size=shape).astype(np.float32))
            prm.copy_(torch.from_numpy(w))


def image_block(nl_nl):
    return nl_nl + [BOI] + [IMAGE_TOKEN] * MM_TOKENS + [EOI] + nl_nl


def build_prompt(sp, pieces):
    """pieces: strings and ints (an int is an image). Returns ids (BOS first) and token_type_ids."""
    nl_nl = sp.encode("\n\n")
    ids = [2]
    for p in pieces:
        ids += image_block(nl_nl) if isinstance(p, int) else sp.encode(p)
    types = [1 if i == IMAGE_TOKEN else 0 for i in ids]
    return ids, types


def write_text_gguf(path, text_cfg, tensors, vocab):
    """llama.cpp Gemma3Model conversion of the language model, BF16 matrices."""
    import gguf

    tokens, scores, types = vocab
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_type("model")
    w.add_name("Gemma3 Tiny Vision Random")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_BF16))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(text_cfg["max_position_embeddings"])
    w.add_embedding_length(text_cfg["hidden_size"])
    w.add_block_count(text_cfg["num_hidden_layers"])
    w.add_feed_forward_length(text_cfg["intermediate_size"])
    w.add_head_count(text_cfg["num_attention_heads"])
    w.add_head_count_kv(text_cfg["num_key_value_heads"])
    w.add_key_length(text_cfg["head_dim"])
    w.add_value_length(text_cfg["head_dim"])
    w.add_layer_norm_rms_eps(text_cfg["rms_norm_eps"])
    w.add_rope_freq_base(1e6)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(8.0)
    w.add_sliding_window(text_cfg["sliding_window"])
    w.add_uint32("gemma3.attention.query_pre_attn_scalar", int(text_cfg["query_pre_attn_scalar"]))
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
    for name, arr in tensors.items():
        gname = hf_to_gguf_name(name)
        data = np.ascontiguousarray(arr, dtype=np.float32)
        if gname == "token_embd.weight":
            data = data[: len(tokens)]  # the converter drops rows past the tokenizer
        if name.endswith("norm.weight"):
            w.add_tensor(gname, (data + np.float32(1.0)).astype(np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MMPROJ_LAYER = {
    "layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def mmproj_name(hf):
    import re

    # transformers 5.24 saves the tower as "vision_tower.embeddings..." (no "vision_model.");
    # Hub files have "vision_tower.vision_model.embeddings...".
    hf = hf.split("vision_tower.", 1)[-1].split("multi_modal_projector.", 1)[-1]
    if not hf.startswith(("vision_model.", "mm_")):
        hf = "vision_model." + hf
    fixed = {
        "vision_model.embeddings.patch_embedding.weight": "v.patch_embd.weight",
        "vision_model.embeddings.patch_embedding.bias": "v.patch_embd.bias",
        "vision_model.embeddings.position_embedding.weight": "v.position_embd.weight",
        "vision_model.post_layernorm.weight": "v.post_ln.weight",
        "vision_model.post_layernorm.bias": "v.post_ln.bias",
        "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
        "mm_input_projection_weight": "mm.input_projection.weight",
    }
    if hf in fixed:
        return fixed[hf]
    m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    return f"v.blk.{m.group(1)}.{MMPROJ_LAYER[m.group(2)]}.{m.group(3)}"


def write_mmproj(path, tensors, text_hidden):
    """llama.cpp's mmproj for gemma3 (clip.projector_type gemma3)."""
    import gguf

    v = TINY_VISION
    w = gguf.GGUFWriter(path, "clip")
    w.add_type("mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "gemma3")
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.block_count", v["num_hidden_layers"])
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    w.add_uint32("clip.vision.projection_dim", text_hidden)
    side = v["image_size"] // v["patch_size"]
    w.add_uint32("clip.vision.projector.scale_factor", side // int(round(math.sqrt(MM_TOKENS))))
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    for name, arr in tensors.items():
        g = mmproj_name(name)
        data = np.ascontiguousarray(arr, dtype=np.float32)
        if g == "mm.soft_emb_norm.weight":
            data = (data + np.float32(1.0)).astype(np.float32)  # Gemma RMSNorm: GGUF holds 1 + w
        if data.ndim == 1:
            w.add_tensor(g, data)
        else:  # HF bytes unchanged (GGUF ne = reversed shape), incl. the [Hv, H] projection
            w.add_tensor(g, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "data"))
    ap.add_argument("--out", default=os.path.join(data, "tiny-vision"))
    args = ap.parse_args()
    out = args.out
    os.makedirs(os.path.join(out, "goldens"), exist_ok=True)

    import sentencepiece as spm
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig

    torch.manual_seed(SEED)
    shutil.copyfile(os.path.join(data, "tiny", "tokenizer.model"), os.path.join(out, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert sp.id_to_piece(BOI) == "<start_of_image>" and sp.id_to_piece(EOI) == "<end_of_image>"

    cfg = make_config()
    cfg._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    model.set_attn_implementation("eager")
    init_weights(model, SEED)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # Goldens come from the saved folder loaded back in fp32 (what the tests load). Converting
    # the in-memory model back to fp32 would not do: its RoPE inv_freq buffers went through bf16.
    model = Gemma3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation="eager").eval()

    rng = np.random.Generator(np.random.PCG64(SEED + 1))
    S = TINY_VISION["image_size"]
    pixels = rng.uniform(-1.0, 1.0, size=(2, 3, S, S)).astype(np.float32)
    pv = torch.from_numpy(pixels)

    goldens = {}

    def save(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        arr.tofile(os.path.join(out, "goldens", name + ".f32"))
        goldens[name] = {"file": f"goldens/{name}.f32", "shape": list(arr.shape)}

    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=pv).last_hidden_state
        projected = model.model.multi_modal_projector(tower)
        assert torch.equal(projected, model.model.get_image_features(pv).pooler_output)
        save("pixels", pixels)
        save("tower", tower.numpy())
        save("projected", projected.numpy())

        prompts = {
            "one_image": ["Describe", 0, "the river and the boat."],
            "two_images": ["Compare", 0, "with", 1, "please, in two words."],
        }
        prompt_ids = {}
        for name, pieces in prompts.items():
            ids, types = build_prompt(sp, pieces)
            n_img = sum(isinstance(p, int) for p in pieces)
            kw = dict(input_ids=torch.tensor([ids]), pixel_values=pv[:n_img], use_cache=False)
            logits = model(**kw, token_type_ids=torch.tensor([types])).logits[0]
            save(f"{name}.logits", logits.numpy())
            prompt_ids[name] = {"ids": ids, "images": [p for p in pieces if isinstance(p, int)]}
            if name == "one_image":
                causal = model(**kw).logits[0]
                save("one_image_causal.logits", causal.numpy())
                d = (logits - causal).abs().max().item()
                assert d > 1e-3, f"bidirectional groups changed nothing ({d})"
                print(f"one_image: max |bidir - causal| logits = {d:.3g}")

        # End to end from a committed image file: Pillow decode + the PIL image processor at 64 px
        # (tests/data/images, made by make_image_goldens.py); last position's logits only.
        from PIL import Image
        from transformers import Gemma3ImageProcessorPil

        proc = Gemma3ImageProcessorPil(size={"height": S, "width": S}, do_pan_and_scan=False)
        img = Image.open(os.path.join(data, "images", E2E_IMAGE)).convert("RGB")
        e2e_pixels = proc(images=[img], return_tensors="pt").pixel_values
        assert tuple(e2e_pixels.shape) == (1, 3, S, S), e2e_pixels.shape
        ids, types = build_prompt(sp, E2E_PROMPT)
        logits = model(input_ids=torch.tensor([ids]), pixel_values=e2e_pixels, use_cache=False,
                       token_type_ids=torch.tensor([types])).logits[0]
        save("e2e.last_logits", logits[-1:].numpy())
        prompt_ids["e2e"] = {"ids": ids, "image_file": f"images/{E2E_IMAGE}"}

    # GGUF versions (text model + mmproj), converter conventions.
    st = {k: v.float().numpy() for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    text = {k: v for k, v in st.items() if ".language_model." in k or k.startswith("language_model.")}
    vis = {k: v for k, v in st.items() if k not in text}
    text_cfg = cfg.text_config.to_dict()
    vocab = sentencepiece_vocab(os.path.join(out, "tokenizer.model"), SPECIAL_PIECES)
    write_text_gguf(os.path.join(out, "text-bf16.gguf"), text_cfg, text, vocab)
    write_mmproj(os.path.join(out, "mmproj-bf16.gguf"), vis, TINY_TEXT["hidden_size"])

    manifest = {
        "format": "raw little-endian float32, row-major; files relative to this folder",
        "generator": {
            "script": "tools/reference/make_vision_goldens.py", "seed": SEED,
            "python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "attn_implementation": "eager", "dtype": "float32",
        },
        "boi": BOI, "eoi": EOI, "image_token": IMAGE_TOKEN, "newlines": sp.encode("\n\n"),
        "prompts": prompt_ids,
        "tensors": goldens,
    }
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(out) for fn in fns)
    print(f"wrote {out}: {len(st)} tensors, {total} bytes in all")


if __name__ == "__main__":
    main()
