#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/safetensors/ and fuzz/corpus/gguf/ (the copies of
tests/data files next to them are plain copies). Standard library only."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def safetensors(path, tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)], written in order."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def main():
    st = os.path.join(HERE, "safetensors")
    os.makedirs(st, exist_ok=True)
    p = "model.layers.%d.self_attn."
    # our own format (load_compressor): linear, kv_dim 4, latent 2, layer 1 exact
    safetensors(os.path.join(st, "ours_linear.safetensors"), [
        (p % 0 + "compress_down.weight", "F32", [2, 4], f32(1, 0, 0, 0, 0, 1, 0, 0)),
        (p % 0 + "compress_up.weight", "F32", [4, 2], f32(1, 0, 0, 1, 0, 0, 0, 0)),
    ], {"deltakv.format": "1", "kind": "linear", "kv_dim": "4", "latent_dim": "2", "hidden": "0", "n_layers": "2"})
    # a paper checkpoint with a config.json carried in the metadata (see fuzz_safetensors.cpp)
    safetensors(os.path.join(st, "paper_config.safetensors"), [
        ("compress_down.weight", "F32", [2, 4], f32(*range(8))),
        ("compress_down.bias", "F32", [2], f32(0.5, -0.5)),
        ("compress_up.weight", "F32", [4, 2], f32(*range(8))),
        ("lm_head.weight", "BF16", [2, 2], struct.pack("<4H", 0x3F80, 0x4000, 0xBF80, 0x0000)),
    ], {"config.json": json.dumps({"compressor_down_type": "linear", "compressor_up_type": "auto",
                                   "kv_compressed_size": 2, "compressor_linear_bias": True, "split_kv": False})})
    # every dtype once, an empty tensor, a gap between tensors
    safetensors(os.path.join(st, "dtypes.safetensors"), [
        ("f64", "F64", [2], struct.pack("<2d", 1.5, -2.0)),
        ("f16", "F16", [3], struct.pack("<3H", 0x3C00, 0x7C00, 0x0001)),
        ("i32", "I32", [1, 2], struct.pack("<2i", 7, -7)),
        ("i64", "I64", [1], struct.pack("<q", -1)),
        ("i16", "I16", [1], struct.pack("<h", 3)),
        ("i8", "I8", [2], struct.pack("<2b", -1, 1)),
        ("u8", "U8", [1], b"\x07"),
        ("bool", "BOOL", [1], b"\x01"),
        ("empty", "F32", [0, 5], b""),
    ])

    gg = os.path.join(HERE, "gguf")
    os.makedirs(gg, exist_ok=True)
    # v3, alignment 8, a string array and a nested array; tensors F16 [4], Q8_0 [32], BF16 [2, 2]
    kv = [
        (gguf_string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 8)),
        (gguf_string("names") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2) + gguf_string("a") + gguf_string("bc")),
        (gguf_string("nested") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 5, 2) +
         struct.pack("<2i", -1, 2)),
    ]
    tensors = [
        gguf_string("t.f16") + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<I", 1) + struct.pack("<Q", 0),
        gguf_string("t.q8") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<I", 8) + struct.pack("<Q", 8),
        gguf_string("t.bf16") + struct.pack("<I", 2) + struct.pack("<2Q", 2, 2) + struct.pack("<I", 30) +
        struct.pack("<Q", 48),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(tensors)
    head += b"\0" * ((8 - len(head) % 8) % 8)
    data = struct.pack("<4H", 0x3C00, 0x4000, 0xC000, 0x0000)  # 1, 2, -2, 0
    data += struct.pack("<H", 0x3800) + bytes(range(32))         # d = 0.5, q = 0..31
    data += b"\0" * 6 + struct.pack("<4H", 0x3F80, 0xC000, 0x7F80, 0x0001)  # bf16 at 48: 1, -2, inf, tiny
    with open(os.path.join(gg, "tiny_v3.gguf"), "wb") as f:
        f.write(head + data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
