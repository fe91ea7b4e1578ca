#!/usr/bin/env python3
"""Builds the tiny random Gemma 3 test model in tests/data/tiny/.

What it writes (all deterministic for a given seed and package versions):
  tokenizer.model         SentencePiece BPE model (512 pieces) trained on TRAINING_TEXT below
  model.safetensors       float32 weights of a random Gemma3ForCausalLM (HF naming, tied head)
  config.json             as save_pretrained writes it (transformers 5.x: rope_parameters per layer type)
  generation_config.json  as save_pretrained writes it
  versions.json           package versions used

The model has the real Gemma 3 structure at toy size (see TINY in this file): 8 layers with the
real 6-periodic pattern (layer 5 global, 0-4 and 6-7 local), GQA 4/2, head_dim 32,
query_pre_attn_scalar 24 (deliberately != head_dim, so an engine that derives the scale from
head_dim fails), sliding window 8, RoPE theta 1e6 + linear x8 on the global layer only and
theta 1e4 unscaled on local layers.

Weights come from numpy's PCG64 generator (not torch's RNG) so they do not depend on the torch
version, and every value is rounded to the nearest bfloat16 and stored as float32: the same
weights can then be written to bf16/f16-free formats without loss, and a bf16 weight path in the
engine sees exactly the same numbers as the fp32 reference. Every RMSNorm weight is random
(normal(0, 0.3)), so a missing or doubled (1 + w) changes the outputs visibly.

Usage:  python tools/reference/make_tiny_model.py [--out tests/data/tiny] [--seed 20250301]
"""

import argparse
import io
import json
import math
import os
import sys

import numpy as np

SEED = 20250301

TINY = dict(
    vocab_size=512,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=24,
    sliding_window=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta_global=1e6,
    rope_theta_local=1e4,
    rope_linear_factor_global=8.0,
)

# Special pieces: ids 0..3 are SentencePiece's pad/eos/bos/unk (Gemma's order), then the
# control symbols get ids 4..7, then the 256 byte-fallback pieces <0x00>..<0xFF> (ids 8..263),
# then the learned BPE pieces (ids 264..511).
CONTROL_SYMBOLS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]

# A few KB of plain English for the tokenizer trainer. One training "sentence" per line; no
# newlines inside pieces, so "\n" is encoded by byte fallback (<0x0A>) with this tokenizer.
TRAINING_TEXT = """\
The little town sat at the edge of a wide river, and every morning the fog rolled in from the water.
People walked to the market before the sun was high, carrying baskets of bread, apples and cheese.
A small boat with a red sail crossed the river twice a day, once at seven and once at four.
The ferryman was an old man who had worked on the water for forty years and knew every stone.
Children waited on the bank to wave at him, and he always waved back with his whole arm.
In the spring the fields along the river turned green, then yellow, then gold in late summer.
Farmers counted the days until the harvest and hoped the rain would stay away for one more week.
The school had three rooms, a bell on the roof, and a teacher who loved numbers more than words.
She told the children that 2 and 2 make 4, that 10 times 10 is 100, and that 365 days make a year.
One boy asked her why the river never ran out of water, and she took the class outside to see.
They followed the stream up the hill, past the mill and the old stone bridge, to a quiet spring.
Water came out of the ground there, cold and clear, and the children put their hands into it.
The teacher explained that rain falls on the mountains, sinks into the earth and comes back out.
On the way home they saw a heron standing on one leg in the shallow water near the reeds.
The heron did not move at all until a fish came close, and then it struck faster than an eye blink.
Evening came early in the autumn, and the lamps in the windows made long lines of light on the river.
The baker closed his shop at six, swept the floor, and left one loaf on the step for anyone in need.
Nobody knew who took the bread each night, but it was always gone by the time the birds woke up.
Winter brought snow, and the river froze near the banks while the middle kept running dark and fast.
The ferry stopped for two months, so people used the bridge, which was a long walk for most of them.
Some of the older children built a sled from boards and rope and raced it down the hill by the church.
Their parents watched from the road and laughed, and then they tried the sled themselves.
When the ice melted, the river rose and carried branches, leaves and once even a wooden chair.
The ferryman fished the chair out of the water, dried it in the sun, and kept it by his door.
He said that a chair that travels so far deserves a good rest, and he sat in it every evening.
Years passed, and the town grew a little, with a new road, a post office and a station for the train.
The first train arrived on a Monday in May at 9:15, and the whole town came to see it.
It was loud and black and smelled of smoke, and the smallest children hid behind their mothers.
Soon people could travel to the city in two hours, and some of them moved away to find work.
Others came to the town for the quiet, the clean air, and the view of the river from the hill.
The old ferryman still crossed the water every day, even though fewer people needed his boat.
He said the river was his friend and that a friend should be visited, whether or not there is a reason.
When he finally stopped working, the town gave him a small party with music, cake and speeches.
The teacher, now old herself, read a short poem about the water, the fog and the red sail.
Everyone clapped, and the ferryman wiped his eyes and said thank you, thank you, very quietly.
The next morning the fog rolled in from the river as always, and the market opened before the sun.
Questions help us learn: what is the distance to the city, how much does a ticket cost, and when?
The answer was 42 miles, 3 coins, and every hour from 6 in the morning until 8 at night.
Good stories often begin with a place, a person and a problem that needs to be solved.
This one is about a river that kept going, a town that kept changing, and people who kept caring.
"""


def train_tokenizer(out_dir):
    import sentencepiece as spm

    lines = [l for l in TRAINING_TEXT.splitlines() if l.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=TINY["vocab_size"],
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=CONTROL_SYMBOLS,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == TINY["vocab_size"], sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert [sp.id_to_piece(4 + i) for i in range(4)] == CONTROL_SYMBOLS
    assert sp.id_to_piece(8) == "<0x00>" and sp.id_to_piece(263) == "<0xFF>"
    return path


def layer_types(n_layers):
    # Gemma 3 rule: layer i is global iff (i + 1) % 6 == 0.
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]


def make_config():
    from transformers import Gemma3TextConfig

    t = TINY
    cfg = Gemma3TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        query_pre_attn_scalar=t["query_pre_attn_scalar"],
        sliding_window=t["sliding_window"],
        max_position_embeddings=t["max_position_embeddings"],
        rms_norm_eps=t["rms_norm_eps"],
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        layer_types=layer_types(t["num_hidden_layers"]),
        # transformers 5.x: one RoPE parameter set per layer type. Linear scaling only on the
        # global ("full_attention") layers, local layers plain default RoPE with base 1e4.
        rope_parameters={
            "full_attention": {
                "rope_type": "linear",
                "factor": t["rope_linear_factor_global"],
                "rope_theta": t["rope_theta_global"],
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": t["rope_theta_local"]},
        },
        attention_bias=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return cfg


def bf16_round(a):
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def init_weights(model, seed):
    """Deterministic init from numpy. Std chosen so activations stay O(1) through the layers."""
    import torch

    rng = np.random.Generator(np.random.PCG64(seed))
    t = TINY
    H, I = t["hidden_size"], t["intermediate_size"]
    q_w = t["num_attention_heads"] * t["head_dim"]
    with torch.no_grad():
        for name, p in model.named_parameters():  # deterministic (module definition) order
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                std = 0.3  # (1 + w) in roughly [0.1, 1.9]: a missing/doubled +1 is visible
            elif name.endswith("embed_tokens.weight"):
                std = 0.1  # x sqrt(96) ~ 9.8 -> embedding output ~ O(1); tied head logits ~ O(1)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                std = 1.0 / math.sqrt(H)
            elif name.endswith("o_proj.weight"):
                std = 1.0 / math.sqrt(q_w)
            elif name.endswith("down_proj.weight"):
                std = 1.0 / math.sqrt(I)
            else:
                raise RuntimeError(f"unexpected parameter {name}")
            w = bf16_round(rng.normal(0.0, std, size=shape).astype(np.float32))
            p.copy_(torch.from_numpy(w))


def verify_rope(model):
    """Reads the instantiated rotary embedding: global layers base 1e6 / 8, local base 1e4 unscaled."""
    import torch

    rot = model.model.rotary_emb
    hd = TINY["head_dim"]
    exps = torch.arange(0, hd, 2, dtype=torch.float) / hd
    want_g = 1.0 / (TINY["rope_theta_global"] ** exps) / TINY["rope_linear_factor_global"]
    want_l = 1.0 / (TINY["rope_theta_local"] ** exps)
    got_g = rot.full_attention_inv_freq
    got_l = rot.sliding_attention_inv_freq
    assert torch.allclose(got_g, want_g, rtol=1e-6, atol=0), (got_g, want_g)
    assert torch.allclose(got_l, want_l, rtol=1e-6, atol=0), (got_l, want_l)
    assert rot.full_attention_attention_scaling == 1.0
    assert rot.sliding_attention_attention_scaling == 1.0
    for i, layer in enumerate(model.model.layers):
        want_sliding = (i + 1) % 6 != 0
        assert layer.self_attn.is_sliding == want_sliding, i
        assert layer.self_attn.sliding_window == (TINY["sliding_window"] if want_sliding else None), i
        assert abs(layer.self_attn.scaling - TINY["query_pre_attn_scalar"] ** -0.5) < 1e-12


def versions():
    import sentencepiece
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data", "tiny"))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="safetensors dtype; bfloat16 is lossless here (weights are bf16-exact) and halves the file")
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    os.makedirs(out, exist_ok=True)

    import torch
    from transformers import Gemma3ForCausalLM, GenerationConfig

    torch.manual_seed(args.seed)  # only affects HF's own init, which init_weights overwrites
    train_tokenizer(out)

    cfg = make_config()
    model = Gemma3ForCausalLM(cfg).to(torch.float32).eval()
    init_weights(model, args.seed)
    verify_rope(model)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    dtype = getattr(torch, args.dtype)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)

    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump({"generator": "tools/reference/make_tiny_model.py", "seed": args.seed, **versions()}, f, indent=2)
        f.write("\n")

    # Read back and check the file really holds what we built.
    from safetensors.torch import load_file

    st = load_file(os.path.join(out, "model.safetensors"))
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(st) == set(sd), (sorted(set(st) ^ set(sd)))
    for k, v in sd.items():
        assert st[k].dtype == dtype and torch.equal(st[k].float(), v), k
    print(f"wrote {out}: {len(st)} {args.dtype} tensors, {sum(v.numel() for v in st.values())} parameters")


if __name__ == "__main__":
    main()
