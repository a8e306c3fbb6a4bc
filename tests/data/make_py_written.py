#!/usr/bin/env python3
"""Writes py_written.safetensors next to this script with the reference (Python) safetensors
package, so tests/test_safetensors.cpp can check our reader against an independent writer.

Contents (the C++ test recomputes these):
  "a": float32, shape [3, 4], values arange(12) * 0.5 - 1      -> -1.0, -0.5, ..., 4.5
  "b": float16, shape [5], values [1, -2.5, 65504, 6e-8, 0.333] rounded to half:
       bits 0x3C00, 0xC100, 0x7BFF, 0x0001 (smallest subnormal, 2^-24), 0x3554 (0.3330078125)
  "d": int32,   shape [2], values [7, -3]
  metadata: {"format": "pt"}
numpy has no bfloat16, so no BF16 tensor here; the C++ tests cover BF16 with hand-made bytes.
"""
import os

import numpy as np
from safetensors.numpy import save_file

here = os.path.dirname(os.path.abspath(__file__))
tensors = {
    "a": (np.arange(12, dtype=np.float32) * 0.5 - 1).reshape(3, 4),
    "b": np.array([1, -2.5, 65504, 6e-8, 0.333], dtype=np.float16),
    "d": np.array([7, -3], dtype=np.int32),
}
assert tensors["b"].view(np.uint16).tolist() == [0x3C00, 0xC100, 0x7BFF, 0x0001, 0x3554]
save_file(tensors, os.path.join(here, "py_written.safetensors"), metadata={"format": "pt"})
