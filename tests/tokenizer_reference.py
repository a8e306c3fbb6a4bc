#!/usr/bin/env python3
"""Reference data for tests/test_tokenizer.cpp (examples/llama/tokenizer.hpp).

Builds an independent tokenizer with the Hugging Face `tokenizers` library from the vocabulary
and merges stored in the SmolLM2-135M-Instruct GGUF file, configured like SmolLM2's own
tokenizer.json:
  model          BPE(vocab, merges)                 (no unk token, no byte fallback)
  pre-tokenizer  Sequence[Digits(individual_digits=True),
                          ByteLevel(add_prefix_space=False, use_regex=True)]
  decoder        ByteLevel()
  added tokens   every token of type 3 (control), as special tokens matched literally
and writes tests/data/tokenizer_expected.json:
  {"cases": [{"text": ..., "ids": [...]}, ...],   (+ "round_trip": false where bytes are lost)
   "gpl3_prefix": {"path": "/usr/share/common-licenses/GPL-3", "bytes": 2000, "ids": [...]}}

Usage:
  pip install tokenizers gguf
  python3 tests/tokenizer_reference.py [--model PATH] [--out PATH]
  python3 tests/tokenizer_reference.py --unicode-table   # prints the C++ \\p{L}/\\p{N} BMP table

The model defaults to $DELTAKV_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf at the repository
root. --unicode-table needs no model: it regenerates the basic-multilingual-plane range table in
tokenizer.hpp from Python's unicodedata (see the comment there).
"""
import argparse
import json
import os
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GPL3 = "/usr/share/common-licenses/GPL-3"
GPL3_PREFIX_BYTES = 2000

GPL3_PARAGRAPH = (
    "  The GNU General Public License is a free, copyleft license for\n"
    "software and other kinds of works.\n\n"
    "  The licenses for most software and other practical works are designed\n"
    "to take away your freedom to share and change the works.  By contrast,\n"
    "the GNU General Public License is intended to guarantee your freedom to\n"
    "share and change all versions of a program--to make sure it remains free\n"
    "software for all its users.  We, the Free Software Foundation, use the\n"
    "GNU General Public License for most of our software; it applies also to\n"
    "any other work released this way by its authors.  You can apply it to\n"
    "your programs, too.\n"
)

SAMPLES = [
    "Hello, world! This is a simple test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\ty = x  # tab\n",
    "int main() {\n  std::vector<int> v{1, 2, 3};\n  return v.size();\n}\n",
    "12345 3.14",
    "Version 2.0.1 released on 2024-01-15 at 10:30pm; 1,000,000 users, x2 a  1",
    "don't I'll we're they've she'd you'll it's I'm",
    "DON'T I'LL 'quoted' ''s x.'s",
    "a  b\n\n c",
    "   leading spaces and trailing   ",
    "line1\r\nline2\r\n\r\n\tindented\t\t\n",
    "!!! ??? ... --- *** ,,, ;;;",
    "(foo)[bar]{baz}<qux> @#$%^&* \"quoted\" `tick` ~/path\\to",
    "café naïve résumé Ærøskøbing Straße",
    "cafe\u0301 nai\u0308ve",
    "Καλημέρα κόσμε· τι κάνεις;",
    "Привет, мир! Как дела?",
    "你好，世界！今天天气很好。",
    "こんにちは、カタカナとひらがな。",
    "مرحبا بالعالم ١٢٣",
    "नमस्ते दुनिया",
    "안녕하세요 세계",
    "I love 🦀 and 🚀! 👍🏽 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<|im_start| <|im_end|>x<filename>y.py",
    "",
    GPL3_PARAGRAPH,
    "\n\n\n",
    " ",
    "٣٤ ①② x² ½ Ⅻ",
    "a\u00a0b\u3000c\u2003d \u200bz",
    "a" * 47 + " " + "=" * 80,
]

# Characters whose bytes have no token in SmolLM2's vocabulary (0x04 0x13 0x14 0x1D, and the
# 0xF1 lead byte of U+40000): the reference drops them, so these do not round-trip.
LOSSY_SAMPLES = [
    "a\x04b \x13\x14\x1dx \U00040000z",
]


def default_model():
    env = os.environ.get("DELTAKV_MODEL")
    if env:
        return env
    return os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_vocab(path):
    import gguf

    reader = gguf.GGUFReader(path)

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key):
        f = reader.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    model = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "gpt2":
        sys.exit(f"unexpected tokenizer.ggml.model {model!r} (want 'gpt2')")
    return (strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"),
            ints("tokenizer.ggml.token_type"))


def build_reference(tokens, merges, token_types):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        sys.exit("duplicate token strings in the vocabulary")
    pairs = []
    for m in merges:
        a, b = m.split(" ", 1)
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, token_types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def unicode_table():
    """Prints the BMP table of tokenizer.hpp: maximal ranges of letters (L*) and numbers (N*),
    with unassigned code points (Cn) joined to whichever neighbouring range they touch."""
    def cls(c):
        cat = unicodedata.category(chr(c))
        if cat == "Cn":
            return None
        return {"L": "L", "N": "N"}.get(cat[0], "O")

    ranges = []
    for c in range(0x10000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        k = cls(c)
        if k is None:
            continue
        if ranges and ranges[-1][2] == k:
            ranges[-1][1] = c
        else:
            ranges.append([c, c, k])
    cells = [f"{{0x{lo:04X},0x{hi:04X},{k}}}" for lo, hi, k in ranges if k != "O"]
    print(f"// generated by tests/tokenizer_reference.py --unicode-table "
          f"(Unicode {unicodedata.unidata_version}), {len(cells)} ranges")
    for i in range(0, len(cells), 5):
        print("    " + ",".join(cells[i:i + 5]) + ",")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--out", default=os.path.join(HERE, "data", "tokenizer_expected.json"))
    ap.add_argument("--unicode-table", action="store_true")
    args = ap.parse_args()
    if args.unicode_table:
        unicode_table()
        return

    tokens, merges, token_types = read_vocab(args.model)
    tok = build_reference(tokens, merges, token_types)

    cases = []
    for text in SAMPLES:
        ids = encode(tok, text)
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            sys.exit(f"reference round trip failed for {text!r}: {back!r}")
        cases.append({"text": text, "ids": ids})
    for text in LOSSY_SAMPLES:
        cases.append({"text": text, "ids": encode(tok, text), "round_trip": False})

    with open(GPL3, "rb") as f:
        prefix = f.read(GPL3_PREFIX_BYTES).decode("utf-8")
    out = {
        "model": os.path.basename(args.model),
        "cases": cases,
        "gpl3_prefix": {"path": GPL3, "bytes": GPL3_PREFIX_BYTES, "ids": encode(tok, prefix)},
    }
    def dumps(x):
        return json.dumps(x, ensure_ascii=False, separators=(",", ":"))

    with open(args.out, "w", encoding="utf-8") as f:  # one case per line: readable diffs
        f.write('{"model":' + dumps(out["model"]) + ',\n"cases":[\n')
        f.write(",\n".join(dumps(c) for c in cases))
        f.write('\n],\n"gpl3_prefix":' + dumps(out["gpl3_prefix"]) + "}\n")
    with open(args.out, encoding="utf-8") as f:
        assert json.load(f) == out
    print(f"wrote {len(cases)} cases + GPL-3 prefix ({len(out['gpl3_prefix']['ids'])} ids) "
          f"to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
