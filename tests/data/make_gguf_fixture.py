#!/usr/bin/env python3
"""Writes the GGUF fixture for tests/test_gguf.cpp with the `gguf` package (pip install gguf numpy):

  small.gguf           metadata of every value type (string/int/float arrays, a nested array) and
                       tensors F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (1-D to 4-D) quantized with
                       gguf.quants.quantize
  small_expected.bin   the tensors as gguf.quants.dequantize returns them, raw little-endian f32,
                       concatenated (numpy C order = ggml order, ne[0] fastest)
  small_expected.json  {"tensors": [{"name", "type", "ne", "offset", "count"}]}: offset/count in
                       floats into small_expected.bin

Run from anywhere: python3 tests/data/make_gguf_fixture.py. Deterministic (fixed seed).
"""
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(os.path.join(HERE, "small.gguf"), arch="testarch")
    # general.architecture is written by the constructor.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 50))
    w.add_float32("test.f32", 0.15625)
    w.add_float64("test.f64", -2.718281828459045)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "hello gguf ✓")
    w.add_array("test.string_array", ["alpha", "", "gamma δ"])
    w.add_key_value("test.int_array", [3, -1, 4, -1, 5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_key_value("test.u8_array", [0, 255, 7], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_key_value("test.float_array", [0.5, -1.25, 3.0], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_key_value("test.nested_array", [[1, 2], [3]], gguf.GGUFValueType.ARRAY)

    # numpy shape (outer..., row) -> ggml ne = reversed shape.
    specs = [
        ("t.f32", Q.F32, (3, 8)),
        ("t.f16", Q.F16, (5, 16)),
        ("t.q8_0", Q.Q8_0, (3, 64)),
        ("t.q4_0", Q.Q4_0, (4, 32)),
        ("t.q4_1", Q.Q4_1, (2, 96)),
        ("t.q5_0", Q.Q5_0, (2, 64)),
        ("t.q5_1", Q.Q5_1, (3, 32)),
        ("t.q8_0_4d", Q.Q8_0, (2, 3, 2, 32)),
        ("t.f32_1d", Q.F32, (7,)),
    ]
    index = []
    chunks = []
    offset = 0
    for name, qt, shape in specs:
        x = (rng.standard_normal(shape) * 0.7 + rng.standard_normal(shape[:-1] + (1,)) * 0.2).astype(np.float32)
        if qt == Q.F32:
            data = x
            w.add_tensor(name, data)
        elif qt == Q.F16:
            data = x.astype(np.float16)
            w.add_tensor(name, data)
        else:
            data = gguf.quants.quantize(x, qt)
            w.add_tensor(name, data, raw_dtype=qt)
        deq = np.asarray(gguf.quants.dequantize(data, qt), dtype=np.float32).reshape(shape)
        assert np.abs(deq - x).max() < 0.5, name
        flat = np.ascontiguousarray(deq).reshape(-1).astype("<f4")
        index.append({"name": name, "type": qt.name, "ne": list(reversed(shape)), "offset": offset, "count": int(flat.size)})
        chunks.append(flat)
        offset += flat.size

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    np.concatenate(chunks).tofile(os.path.join(HERE, "small_expected.bin"))
    with open(os.path.join(HERE, "small_expected.json"), "w") as f:
        json.dump({"tensors": index}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
