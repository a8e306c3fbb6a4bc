#!/usr/bin/env python3
"""Independent numpy reference for the example llama engine (examples/llama), used by
tests/test_engine.cpp through the committed files it writes:

  tests/data/llama_expected.json  tokens, sampled column ids, per-row argmax / max logit /
                                  logsumexp / logit of the next token, mean NLL, bin layout
  tests/data/llama_expected.bin   raw little-endian f32: logits of every row at the sampled
                                  columns [rows, n_cols], then the full last row [vocab]

Weights come from the GGUF through the `gguf` package (GGUFReader + gguf.quants.dequantize, not
the C++ reader); the forward pass runs in float64 over the whole sequence at once (no cache):
RMSNorm, Q/K/V, interleaved RoPE (pairs 2i, 2i+1: llama.cpp's "normal" rope, which the GGUF
converter's Q/K permutation is meant for), causal GQA softmax attention, SwiGLU FFN, tied LM head
when output.weight is absent.

  python3 tests/llama_reference.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
  python3 tests/llama_reference.py --compare-rope   # NLL with interleaved vs rotate_half RoPE

Needs numpy and gguf (pip install gguf numpy).
"""
import argparse
import json
import os

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
#  Water boils at one hundred degrees Celsius, and it freezes at zero. The capital of Spain is"
# (SmolLM2 BPE ids, no BOS).
TOKENS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30, 378, 3575, 282, 7158, 314, 7268,
          30, 4643, 36411, 418, 582, 3822, 5027, 20590, 28, 284, 357, 43145, 418, 6708, 30, 378, 3575, 282, 7476, 314]
N_COLUMNS = 1024


class Model:
    def __init__(self, path: str):
        r = gguf.GGUFReader(path)
        self.reader = r
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        assert meta["general.architecture"] == "llama"
        self.n_layers = int(meta["llama.block_count"])
        self.hidden = int(meta["llama.embedding_length"])
        self.n_q = int(meta["llama.attention.head_count"])
        self.n_kv = int(meta["llama.attention.head_count_kv"])
        self.hd = self.hidden // self.n_q
        self.rot = int(meta.get("llama.rope.dimension_count", self.hd))
        self.theta = float(meta["llama.rope.freq_base"])
        self.eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
        self.tensors = {t.name: t for t in r.tensors}

    def w(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, dtype=np.float64).reshape([int(d) for d in reversed(t.shape.tolist())])

    def rms(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x: np.ndarray, pos: np.ndarray, style: str) -> np.ndarray:
        # x [T, heads, hd]
        half = self.rot // 2
        inv = self.theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.rot)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = x.copy()
        if style == "interleaved":
            a, b = x[..., 0:self.rot:2], x[..., 1:self.rot:2]
            out[..., 0:self.rot:2] = a * c - b * s
            out[..., 1:self.rot:2] = b * c + a * s
        else:  # rotate_half
            a, b = x[..., :half], x[..., half:self.rot]
            out[..., :half] = a * c - b * s
            out[..., half:self.rot] = b * c + a * s
        return out

    def logits(self, tokens, style: str = "interleaved") -> np.ndarray:
        T = len(tokens)
        pos = np.arange(T)
        emb = self.w("token_embd.weight")
        x = emb[np.asarray(tokens)]
        group = self.n_q // self.n_kv
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(self.n_layers):
            p = f"blk.{l}."
            h = self.rms(x, self.w(p + "attn_norm.weight"))
            q = (h @ self.w(p + "attn_q.weight").T).reshape(T, self.n_q, self.hd)
            k = (h @ self.w(p + "attn_k.weight").T).reshape(T, self.n_kv, self.hd)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(T, self.n_kv, self.hd)
            q, k = self.rope(q, pos, style), self.rope(k, pos, style)
            att = np.empty((T, self.n_q, self.hd))
            for hh in range(self.n_q):
                kv = hh // group
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                att[:, hh, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
            x = x + att.reshape(T, -1) @ self.w(p + "attn_output.weight").T
            h = self.rms(x, self.w(p + "ffn_norm.weight"))
            g = h @ self.w(p + "ffn_gate.weight").T
            u = h @ self.w(p + "ffn_up.weight").T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ self.w(p + "ffn_down.weight").T
        h = self.rms(x, self.w("output_norm.weight"))
        out = self.w("output.weight") if "output.weight" in self.tensors else emb
        return h @ out.T


def logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=-1))


def mean_nll(z: np.ndarray, tokens) -> float:
    lse = logsumexp(z)
    return float(np.mean([lse[i] - z[i, tokens[i + 1]] for i in range(len(tokens) - 1)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(HERE, "data", "llama_expected"))
    ap.add_argument("--compare-rope", action="store_true")
    args = ap.parse_args()

    m = Model(args.model)
    z = m.logits(TOKENS)
    T, V = z.shape
    if args.compare_rope:
        zh = m.logits(TOKENS, "half")
        print(f"mean NLL interleaved {mean_nll(z, TOKENS):.4f}  rotate_half {mean_nll(zh, TOKENS):.4f}")
        print("last-row top-1 interleaved", int(z[-1].argmax()), "rotate_half", int(zh[-1].argmax()))
        return

    cols = np.sort(np.random.default_rng(0).choice(V, N_COLUMNS, replace=False))
    sampled = z[:, cols].astype("<f4")
    last = z[-1].astype("<f4")
    np.concatenate([sampled.reshape(-1), last]).tofile(args.out + ".bin")
    lse = logsumexp(z)
    info = {
        "model": os.path.basename(args.model),
        "model_bytes": os.path.getsize(args.model),
        "tokens": TOKENS,
        "vocab": int(V),
        "columns": [int(c) for c in cols],
        "argmax": [int(i) for i in z.argmax(axis=-1)],
        "max_logit": [float(v) for v in z.max(axis=-1)],
        "logsumexp": [float(v) for v in lse],
        "next_token_logit": [float(z[i, TOKENS[i + 1]]) for i in range(T - 1)],
        "mean_nll": mean_nll(z, TOKENS),
        "bin": {"sampled": {"offset": 0, "shape": [T, N_COLUMNS]},
                "last_row": {"offset": T * N_COLUMNS, "shape": [int(V)]}},
    }
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"rows {T}, vocab {V}, last-row top-1 {int(z[-1].argmax())}, mean NLL {info['mean_nll']:.4f}")


if __name__ == "__main__":
    main()
