#!/usr/bin/env python3
"""Writes tiny DeltaKV compressor checkpoints in the paper's tensor layout with the reference
(Python) safetensors package, plus numpy-computed codec outputs, for tests/test_checkpoint.cpp.

paper_swiglu.safetensors (3 layers; layer 1 has no compressor tensors = an exact layer):
  model.layers.{0,2}.self_attn.compress_down.w12.weight [24, 16]  (+ .bias [24])   h = 12
  model.layers.{0,2}.self_attn.compress_down.w3.weight  [4, 12]   (+ .bias [4])    d_c = 4
  model.layers.{0,2}.self_attn.compress_up.weight       [16, 4]   (+ .bias [16])   kv_dim = 16
  plus two unrelated model tensors the loader must ignore. All float32.
paper_swiglu_expected.safetensors:
  X, REF [5, 16] float32 inputs; for l in {0, 2}: Z.l = f_c(X) - f_c(REF), XHAT.l = f_d(Z.l) + REF
  as float64, computed in float64 from the float32 weights:
  f_c(x) = w3(silu(x1) * x2) with [x1 | x2] = w12(x), silu(a) = a / (1 + exp(-a)); f_d = up.

paper_linear.safetensors (2 layers, sizes to be inferred, no config.json):
  layer 0: compress_down.weight [4, 16] + bias, compress_up.weight [16, 4] + bias, float32
  layer 1: the same weights without biases, stored as float16 (checks dtype widening)
paper_linear_expected.safetensors: X, REF float32; Z.l, XHAT.l (l in {0, 1}) float64, computed
  in float64 from the weights exactly as stored (float16 values widened).
"""
import os

import numpy as np
from safetensors.numpy import save_file

here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20260208)
D, H, DC, N = 16, 12, 4, 5


def f32(a):
    return np.asarray(a, dtype=np.float32)


def silu(a):
    return a / (1.0 + np.exp(-a))


def linear(x, w, b):
    y = x @ w.astype(np.float64).T
    return y if b is None else y + b.astype(np.float64)


X = f32(rng.standard_normal((N, D)))
REF = f32(rng.standard_normal((N, D)))
x64, ref64 = X.astype(np.float64), REF.astype(np.float64)

# ---- SwiGLU --------------------------------------------------------------------------------
sw = {}
sw_expected = {"X": X, "REF": REF}
for layer in (0, 2):
    p = f"model.layers.{layer}.self_attn."
    w12 = f32(rng.standard_normal((2 * H, D)) / np.sqrt(D))
    b12 = f32(0.1 * rng.standard_normal(2 * H))
    w3 = f32(rng.standard_normal((DC, H)) / np.sqrt(H))
    b3 = f32(0.1 * rng.standard_normal(DC))
    up = f32(rng.standard_normal((D, DC)) / np.sqrt(DC))
    bup = f32(0.1 * rng.standard_normal(D))
    sw[p + "compress_down.w12.weight"] = w12
    sw[p + "compress_down.w12.bias"] = b12
    sw[p + "compress_down.w3.weight"] = w3
    sw[p + "compress_down.w3.bias"] = b3
    sw[p + "compress_up.weight"] = up
    sw[p + "compress_up.bias"] = bup

    def f_c(x):
        h = linear(x, w12, b12)
        return linear(silu(h[:, :H]) * h[:, H:], w3, b3)

    z = f_c(x64) - f_c(ref64)
    sw_expected[f"Z.{layer}"] = z
    sw_expected[f"XHAT.{layer}"] = linear(z, up, bup) + ref64
sw["model.embed_tokens.weight"] = f32(rng.standard_normal((4, 8)))
sw["model.layers.1.self_attn.q_proj.weight"] = f32(rng.standard_normal((8, 8)))
save_file(sw, os.path.join(here, "paper_swiglu.safetensors"), metadata={"format": "pt"})
save_file(sw_expected, os.path.join(here, "paper_swiglu_expected.safetensors"))

# ---- linear --------------------------------------------------------------------------------
lin = {}
lin_expected = {"X": X, "REF": REF}
for layer, dtype, with_bias in ((0, np.float32, True), (1, np.float16, False)):
    p = f"model.layers.{layer}.self_attn."
    down = (rng.standard_normal((DC, D)) / np.sqrt(D)).astype(dtype)
    up = (rng.standard_normal((D, DC)) / np.sqrt(DC)).astype(dtype)
    bd = (0.1 * rng.standard_normal(DC)).astype(dtype) if with_bias else None
    bu = (0.1 * rng.standard_normal(D)).astype(dtype) if with_bias else None
    lin[p + "compress_down.weight"] = down
    lin[p + "compress_up.weight"] = up
    if with_bias:
        lin[p + "compress_down.bias"] = bd
        lin[p + "compress_up.bias"] = bu
    z = linear(x64, down, bd) - linear(ref64, down, bd)
    lin_expected[f"Z.{layer}"] = z
    lin_expected[f"XHAT.{layer}"] = linear(z, up, bu) + ref64
save_file(lin, os.path.join(here, "paper_linear.safetensors"))
save_file(lin_expected, os.path.join(here, "paper_linear_expected.safetensors"))
