#!/usr/bin/env bash
# Checks the shared GPU source (every file in backends/gpu/include/deltakv/gpu except the vendor headers vendor.hpp and
# vendor_ext.hpp: tensor-core tiles, events, graphs) for what would
# break the "one kernel source for CUDA and HIP" rule:
#   api   vendor API outside the vendor header: CUDA/HIP runtime or driver calls and types
#         (cuda*, cu*, hip*), __nv_* types and bf16/f16 intrinsics, vendor headers, CUB/Thrust/
#         cooperative groups/WMMA, inline asm, vendor macros (__CUDA_ARCH__, __HIPCC__, ...).
#   warp  warp intrinsics used directly (__shfl*, __ballot*, __any/__all*, __activemask,
#         __syncwarp, __match/__reduce_*_sync, __popc/__ffs/__clz, warpSize): kernels go through
#         vendor::shfl*/ballot/popcount/first_lane, which take the warp size W.
#   w32   32-lane assumptions: a literal 32 or 31, 0x20/0x1f, a 32-bit all-ones mask
#         (0xffffffff, ~0u, -1u, 4294967295), shifts by 5 (÷32 / ×32), or a warp-size template
#         argument given as a number (warp_sum<32>, shfl_xor<64>, ...).
# Comments and string literals are ignored. A line that needs a literal for a reason that has
# nothing to do with warps may carry the comment `gpu-check: allow(<reason>)`; it exempts that
# line from the w32 rule only (never from api/warp), and every such line is listed.
#
# Usage: scripts/check-gpu-source.sh [DIR]       (default: backends/gpu/include/deltakv/gpu of this checkout)
#        scripts/check-gpu-source.sh --self-test (the check must reject planted violations)
# Exit status: 0 clean, 1 violations found (or the self-test failed), 2 usage error.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "${1:-}" == "--self-test" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # Each case is one planted file, alone in a directory with a copy of vendor.hpp (which is
  # exempt): the check must fail and name the planted file. The control case must pass.
  bad=0
  setup() {
    rm -rf "$tmp/case"
    mkdir -p "$tmp/case"
    cp "$here/../backends/gpu/include/deltakv/gpu/vendor.hpp" "$tmp/case/"
    printf '%s\n' "$1" >"$tmp/case/planted.cuh"
  }
  setup 'template <int W> __device__ float f(float v) { return vendor::shfl_xor<W>(v, 1); }  // 32 in a comment'
  if "$0" "$tmp/case" >"$tmp/out" 2>&1; then
    echo "self-test: control case passes, as expected"
  else
    echo "self-test: the control case was rejected:"; cat "$tmp/out"; bad=1
  fi
  plant() {  # name, content of the planted shared-source file
    setup "$2"
    if "$0" "$tmp/case" >"$tmp/out" 2>&1 || ! grep -q 'planted.cuh:' "$tmp/out"; then
      echo "self-test: NOT rejected: $1"; cat "$tmp/out"; bad=1
    else
      echo "self-test: rejected as expected: $1"
    fi
  }
  plant "__shfl_xor_sync" 'template <int W> __device__ float f(float v) { return __shfl_xor_sync(0xffffffffu, v, 1); }'
  plant "32-lane mask" 'constexpr unsigned kAll = 0xFFFFFFFF;'
  plant "literal warp size" '__device__ int lane() { return threadIdx.x % 32; }'
  plant "warps per block" '__device__ int warp() { return threadIdx.x >> 5; }'
  plant "numeric W" '__device__ float g(float v) { return warp_sum<32>(v); }'
  plant "runtime API" 'inline void h(void* p) { cudaFree(p); }'
  plant "HIP API" 'inline void h(void* p) { (void)hipFree(p); }'
  plant "vendor header" '#include <cuda_fp16.h>'
  plant "warpSize" '__device__ int ws() { return warpSize; }'
  plant "vendor macro" '#if defined(__CUDA_ARCH__)
#endif'
  plant "allow() cannot excuse API" '__device__ unsigned b(bool p) { return __ballot_sync(~0u, p); }  // gpu-check: allow(test)'
  exit $bad
fi

dir="${1:-$here/../backends/gpu/include/deltakv/gpu}"
[[ -d "$dir" ]] || { echo "check-gpu-source: no directory $dir" >&2; exit 2; }

exec python3 - "$dir" <<'PY'
import os, re, sys

root = sys.argv[1]
files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
               if f not in ("vendor.hpp", "vendor_ext.hpp") and not f.startswith("."))

API = [
    (r"^\s*#\s*include\s*[<\"](cuda|cub/|thrust/|cooperative_groups|mma\.h|crt/|nv|hip/|hipcub|rocprim|rocwmma)",
     "vendor header (include it in vendor.hpp)"),
    (r"\bcuda[A-Z_]\w*", "CUDA runtime API"),
    (r"\bcu[A-Z][a-zA-Z]\w*", "CUDA driver API"),
    (r"\bhip[A-Z_]\w*", "HIP runtime API"),
    (r"\b__nv_\w+|\bnv_bfloat16\w*|\bhip_bfloat16\b", "vendor 16-bit type (use vendor::bf16 / vendor::f16)"),
    (r"\b__(float2bfloat16|bfloat162float|float2half|half2float|half22float2|float22half2|bfloat1622float2)\w*",
     "vendor conversion (use vendor::to_float / from_float)"),
    (r"\b(cub|thrust|nvcuda|wmma|cooperative_groups|rocprim|hipcub)\s*::", "vendor library"),
    (r"\b(asm|__asm__|__asm)\b", "inline assembly"),
    (r"\b__(CUDA_ARCH|CUDACC|CUDACC_RTC|NVCC|HIPCC|HIP_DEVICE_COMPILE|HIP_PLATFORM_\w+|HIP_ARCH_\w+|AMDGCN\w*|gfx\w+)__?\b"
     r"|\b__(CUDA_ARCH|CUDACC|NVCC|HIPCC|HIP_DEVICE_COMPILE|AMDGCN_WAVEFRONT_SIZE)__",
     "vendor macro (branch in vendor.hpp)"),
]
WARP = [
    (r"\b__shfl\w*", "warp shuffle (use vendor::shfl / shfl_xor / shfl_up<W>)"),
    (r"\b__ballot\w*", "ballot (use vendor::ballot<W>)"),
    (r"\b__(any|all|uni)(_sync)?\s*\(", "warp vote"),
    (r"\b__activemask\b|\b__syncwarp\b|\b__match_\w+|\b__reduce_\w+_sync\b|\b__lanemask\w*", "warp-synchronous intrinsic"),
    (r"\b__(popc|popcll|ffs|ffsll|clz|clzll)\b", "bit intrinsic on a lane mask (use vendor::popcount / first_lane)"),
    (r"\bwarpSize\b", "warpSize (use the template parameter W)"),
]
W32 = [
    (r"(?<![\w.])3[12][uUlL]*(?![\w.])", "literal 32/31 (warp size or lane mask): use W"),
    (r"(?i)(?<![\w.])0x0*(20|1f)[ul]*(?![\w.])", "literal 0x20/0x1f (warp size or lane mask): use W"),
    (r"(?i)(?<![\w.])0x0*f{8}[ul]*(?![\w.])|~\s*0[uU]\b|(?<![\w.])-\s*1[uU]\b|\b4294967295\b|\(\s*unsigned\s*\)\s*-\s*1\b",
     "32-bit all-ones mask: lane masks are vendor::lane_mask_t<W>"),
    (r"(>>|<<)=?\s*5\b(?!\.)", "shift by 5 (divide/multiply by 32)"),
    (r"\b(shfl\w*|ballot|warp_\w+|block_\w+|lane_mask_t|full_lane_mask)\s*<\s*\d",
     "warp-size template argument given as a number: pass W"),
]
ALLOW = re.compile(r"gpu-check:\s*allow\(([^)]*)\)")

def strip(text):
    """Blank comments and string/char literals, keeping line structure. Returns (code, code_with_strings)."""
    out, keep, i, n = [], [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); keep.append(" " * (j - i)); i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank = re.sub(r"[^\n]", " ", text[i:j])
            out.append(blank); keep.append(blank); i = j
        elif c in "\"'" and not (c == "'" and i > 0 and text[i - 1].isalnum()):  # 1'000 separators
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * max(0, j - i - 2) + (c if j - i >= 2 else ""))
            keep.append(text[i:j]); i = j
        else:
            out.append(c); keep.append(c); i += 1
    return "".join(out), "".join(keep)

findings, allowed = [], []
for path in files:
    try:
        raw = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        continue
    code, with_strings = strip(raw)
    raw_lines, lines, inc_lines = raw.split("\n"), code.split("\n"), with_strings.split("\n")
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(root)))
    for no, (line, inc, rl) in enumerate(zip(lines, inc_lines, raw_lines), 1):
        hits = []
        for rx, why in API:
            if re.search(rx, inc if "include" in rx else line):
                hits.append(("api", why))
        for rx, why in WARP:
            if re.search(rx, line):
                hits.append(("warp", why))
        w32 = [("w32", why) for rx, why in W32 if re.search(rx, line)]
        m = ALLOW.search(rl)
        if w32 and m:
            allowed.append(f"{rel}:{no}: allowed ({m.group(1).strip()}): {rl.strip()}")
            w32 = []
        for kind, why in hits + w32:
            findings.append(f"{rel}:{no}: [{kind}] {why}\n    {rl.strip()}")

print(f"check-gpu-source: {len(files)} file(s) in {root} (vendor.hpp, vendor_ext.hpp excluded): "
      + ", ".join(os.path.relpath(f, root) for f in files))
for a in allowed:
    print("  " + a)
if findings:
    print("\n".join(findings))
    print(f"check-gpu-source: FAILED, {len(findings)} finding(s)")
    sys.exit(1)
print("check-gpu-source: OK")
PY
