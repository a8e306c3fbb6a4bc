#!/usr/bin/env python3
"""Decode-step benchmark driver (issue 5): measures the peer, dense decode attention of every
layer through torch's scaled_dot_product_attention over bf16 KV, then runs our benchmark program
(bench_decode: our dense kernel and DeltaKV + OmniKV) in the same run, and prints one table.

usage: run_bench.py BENCH_DECODE_BINARY [--quick | --prefill] [--json OUT.json]

It also prints the prefill compression table (bench_decode's "prefill" rows) against a tensor-core
floor: the same work at torch's bf16 GEMM rate, measured here.

The SDPA step is one layer's call timed inside a CUDA graph over `layers` calls that cycle through
distinct KV buffers (all layers' bf16 KV does not fit in 80 GB at 128K x 8), so every call reads
its KV from HBM; step time = the graph's time.
"""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

MODELS = {"Llama-3.1-8B": (32, 32, 8, 128), "Qwen2.5-7B": (28, 28, 4, 128)}


def sdpa_step_ms(layers, hq, hkv, d, n, b, budget_bytes=24 << 30):
    per_layer = 2 * b * hkv * n * d * 2
    nbuf = max(2, min(layers, budget_bytes // per_layer))
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(nbuf)]
    vs = [torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(nbuf)]
    out = [None]

    def step():
        for l in range(layers):
            out[0] = F.scaled_dot_product_attention(q, ks[l % nbuf], vs[l % nbuf], enable_gqa=True)

    step()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    reps = 5 if per_layer >= (1 << 30) else 20
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / reps
    del ks, vs, g
    torch.cuda.empty_cache()
    return ms


def copy_bw():
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (e0.elapsed_time(e1) * 1e-3)


def matmul_tflops(n=8192):
    """bf16 GEMM rate of torch (cuBLAS) on this device: the tensor-core rate the prefill floor uses."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * 20 / (e0.elapsed_time(e1) * 1e-3) / 1e12


def prefill_table(rows, peak):
    print(f"\nprefill compression, one compressed layer, one sequence (FixedStride 10, k 4, SwiGLU f_c hidden 3072, "
          f"d_c = kv_dim/4, int4); tensor-core floor = the work at torch's bf16 GEMM rate in this run, {peak:.0f} TFLOP/s")
    print("| model | encode GEMMs on | tokens | ms | tokens/s per layer | floor tokens/s | % of floor | TFLOP/s achieved | "
          "encode GEMMs TFLOP/s | our ref search TFLOP/s | encode share of time |")
    print("|" + "---|" * 11)
    out = []
    for r in rows:
        floor_ms = r["flops"] / (peak * 1e12) * 1e3
        r["tokens_per_s"] = r["tokens"] / (r["ms"] * 1e-3)
        r["floor_tokens_per_s"] = r["tokens"] / (floor_ms * 1e-3)
        r["floor_pct"] = 100 * floor_ms / r["ms"]
        out.append(r)
        print(f"| {r['prefill']} | {r['gemm']} | {r['tokens']:.0f} | {r['ms']:.1f} | {r['tokens_per_s']:.3g} | {r['floor_tokens_per_s']:.3g} | "
              f"{r['floor_pct']:.1f}% | {r['flops'] / (r['ms'] * 1e-3) / 1e12:.1f} | {r['encode_tflops']:.1f} | "
              f"{r['search_tflops']:.1f} | {100 * r['encode_share']:.0f}% |")
    return out


def main():
    binary = sys.argv[1]
    quick = "--quick" in sys.argv
    prefill_only = "--prefill" in sys.argv
    json_out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    dev = torch.cuda.get_device_name()
    ctxs = [4096] if quick else [32768, 131072]
    peer = {}
    tbw = copy_bw()
    peak = matmul_tflops()
    for name, (layers, hq, hkv, d) in MODELS.items() if not prefill_only else []:
        for n in ctxs:
            for b in (1, 8):
                peer[(name, n, b)] = sdpa_step_ms(layers, hq, hkv, d, n, b)
                print(f"# sdpa {name} ctx {n} batch {b}: {peer[(name, n, b)]:.3f} ms/step", flush=True)
    proc = subprocess.run([binary] + (["--quick"] if quick else []) + (["--prefill"] if prefill_only else []),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        sys.exit(proc.returncode)
    rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    for r in rows:
        if "phases" in r:
            print(f"# sparse-layer phases, {r['phases']}: {r['blocks']} blocks, {r['cycles_per_block']:.0f} cycles each: "
                  + ", ".join(r["share"]))
    bw = next(r["copy_bandwidth"] for r in rows if "copy_bandwidth" in r)
    rbw = next((r["read_bandwidth"] for r in rows if "read_bandwidth" in r), float("nan"))
    print(f"\ndevice: {dev}; device-copy bandwidth (read + write): ours {bw / 1e12:.2f} TB/s, torch {tbw / 1e12:.2f} TB/s; "
          f"streaming reads only: {rbw / 1e12:.2f} TB/s (last column)")
    print("| model | ctx | batch | SDPA ms/step | our dense ms/step | DeltaKV+OmniKV ms/step | speedup vs SDPA | resident KV / bf16 "
          "| must-read GB (dense / DeltaKV) | DeltaKV achieved TB/s | DeltaKV % of byte floor | our dense % of floor | full layer ms | full layer, lane kernel | sparse layer ms | sparse, 256 threads | sparse, W from L2 | sparse, two passes | select ms | full layer % of read floor |")
    print("|" + "---|" * 20)
    results = []
    for r in rows:
        if "model" not in r:
            continue
        sd = peer[(r["model"], r["ctx"], r["batch"])]
        floor_dk = r["deltakv_bytes"] / bw * 1e3
        floor_dense = r["dense_bytes"] / bw * 1e3
        r["sdpa_ms"] = sd
        r["speedup_vs_sdpa"] = sd / r["deltakv_ms"]
        r["resident_ratio"] = r["resident_bytes"] / r["bf16_bytes"]
        r["deltakv_floor_pct"] = 100 * floor_dk / r["deltakv_ms"]
        r["dense_floor_pct"] = 100 * floor_dense / r["dense_ms"]
        r["full_layer_read_floor_pct"] = 100 * (r["dense_bytes"] / r["layers"]) / rbw * 1e3 / r["full_layer_ms"]
        results.append(r)
        print(f"| {r['model']} | {r['ctx'] // 1024}K | {r['batch']} | {sd:.3f} | {r['dense_ms']:.3f} | {r['deltakv_ms']:.3f} | "
              f"{r['speedup_vs_sdpa']:.2f}x | {100 * r['resident_ratio']:.1f}% | {r['dense_bytes'] / 1e9:.2f} / {r['deltakv_bytes'] / 1e9:.2f} | "
              f"{r['deltakv_bytes'] / (r['deltakv_ms'] * 1e-3) / 1e12:.2f} | {r['deltakv_floor_pct']:.0f}% | {r['dense_floor_pct']:.0f}% | "
              f"{r['full_layer_ms']:.3f} | {r.get('full_lane_ms', float('nan')):.3f} | {r['sparse_layer_ms']:.3f} | {r.get('sparse_256_ms', float('nan')):.3f} | {r.get('sparse_l2_ms', float('nan')):.3f} | "
              f"{r.get('sparse_2p_ms', float('nan')):.3f} | {r['select_ms']:.3f} | {r['full_layer_read_floor_pct']:.0f}% |")
    pre = prefill_table([r for r in rows if "prefill" in r], peak)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"device": dev, "copy_bw": bw, "read_bw": rbw, "torch_copy_bw": tbw, "gemm_tflops": peak, "rows": results,
                       "prefill": pre}, f, indent=1)


if __name__ == "__main__":
    main()
