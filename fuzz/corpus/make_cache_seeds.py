#!/usr/bin/env python3
"""Writes the seed programs of fuzz/fuzz_cache.cpp into fuzz/corpus/cache/.

Each seed is the byte string the target reads, field by field, in the order it reads them (see
LLVMFuzzerTestOneInput and Program in fuzz_cache.cpp): a header (policy, geometry, knobs) and a
list of operations. The seeds are well-formed programs that reach deep states (long sequences,
compressed blocks, OmniKV selections, Quest pages); the fuzzer mutates from there."""
import os
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")


class Prog:
    def __init__(self, policy, identity, L, hkv, group, hd, sinks, recent, block, k, bits, stride, seqs, tokens,
                 mq, policy_bytes, latent=None, rope=1, metric=0):
        self.b = bytearray()
        self.S = seqs
        self.L = L
        self.lens = {}
        self.u8(policy)
        self.u8(0x01 if identity else 0x00)
        self.u8(L - 1)
        self.u8(hkv - 1)
        self.u8(group - 1)
        self.u8(hd // 2 - 1)
        self.u8(sinks)
        self.u8(recent)
        self.u8(block)
        self.u8(k - 1)
        self.u8(metric)
        self.u8({0: 0, 8: 2, 4: 3}[bits])
        if not identity:
            self.u8(200)           # not the default latent_dim
            self.u8(latent - 1)    # range(1, D)
        self.u8(rope)              # rope style
        self.u8(1)                 # theta 10000
        self.u8(1)                 # rot_dim 0: whole head
        self.u8(stride - 1)
        self.u8(seqs - 1)
        self.u8(tokens - 1)
        self.u8(mq - 1)
        for x in policy_bytes:
            self.u8(x)
        if not identity:
            self.u8(7)
            self.u8(1)             # codec seed (u16)

    def u8(self, x):
        self.b.append(x & 0xFF)

    def batch_common(self, seqs, counts, pos_bytes):
        self.u8(len(seqs))         # B = range(0, S + 1)
        self.u8(0)                 # no structural defect
        self.u8(0)                 # rotation
        for s in seqs:
            self.u8(0)             # bit 0: explicit index
            self.u8(s)             # pick_index
        for c in counts:
            for x in c:
                self.u8(x)
        self.u8(0)                 # ld = width
        for p in pos_bytes:
            for x in p:
                self.u8(x)
        self.u8(5)
        self.u8(9)                 # value seed (u16)
        self.u8(2)                 # mode: uniform [-4, 4]
        if sum(len(p) for p in pos_bytes) > 0:
            self.u8(0)             # no NaN
            self.u8(0)             # data present

    def append(self, layer, seq_counts):
        self.u8(0)                 # op: append
        self.u8(layer)
        self.u8(0)                 # cap_mode: normal counts
        seqs = [s for s, _ in seq_counts]
        counts = [[c] for _, c in seq_counts]
        pos = []
        for s, c in seq_counts:
            pos += [[0]] * c
            self.lens[(layer, s)] = self.lens.get((layer, s), 0) + c
        self.batch_common(seqs, counts, pos)

    def attend(self, layer, seq_rows, dense=False):
        """seq_rows: [(seq, [offsets back from the last position])]"""
        self.u8(8 if dense else 6)
        self.u8(layer)
        seqs = [s for s, _ in seq_rows]
        counts = [[0, len(r)] for _, r in seq_rows]
        pos = []
        for _, r in seq_rows:
            pos += [[0, off] for off in r]
        self.batch_common(seqs, counts, pos)
        self.u8(0)                 # out ld = width
        self.u8(0)                 # no output defect

    def reconstruct(self, layer, seq, n, rope=False):
        self.u8(4)
        self.u8(layer)
        self.u8(seq)
        self.u8(0)                 # small count
        self.u8(n)                 # range(0, 12)
        self.u8(3)
        self.u8(4)                 # position seed
        if n > 0:
            self.u8(0)             # no bad position
        self.u8(0)                 # no output defect
        self.u8(0)                 # ld = width
        self.u8(1 if rope else 0)

    def save(self, name):
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(bytes(self.b))


def main():
    # OmniKV, 4 layers, full layers {0, 2} (exact), top_k 6: long sequences, then the filter
    # layers attend (and select) and the sparse layers attend their selection.
    p = Prog(1, True, L=4, hkv=1, group=2, hd=8, sinks=2, recent=8, block=4, k=2, bits=0, stride=4, seqs=2,
             tokens=100, mq=2, policy_bytes=[0x04, 5, 2, 4, 1])
    for _ in range(4):
        for l in range(4):
            p.append(l, [(0, 20), (1, 9)])
    for l in range(4):
        p.attend(l, [(0, [0, 3]), (1, [0])])
    p.reconstruct(1, 0, 12)
    p.attend(1, [(1, [2])], dense=True)
    p.save("omnikv_long")

    # Quest, 3 layers (layer 0 dense), page 4, budget 12, random codec with int8 latents.
    p = Prog(2, False, L=3, hkv=2, group=1, hd=4, sinks=1, recent=6, block=3, k=3, bits=8, stride=3, seqs=2,
             tokens=90, mq=3, policy_bytes=[3, 11, 1, 1, 2], latent=6)
    for _ in range(4):
        for l in range(3):
            p.append(l, [(1, 19), (0, 7)])
    for l in range(3):
        p.attend(l, [(1, [0, 5, 40]), (0, [1])])
    p.reconstruct(2, 1, 12, rope=True)
    p.save("quest_int8")

    # Dense, identity codec (reconstruction to rounding), int4 off, several tiles of reconstruct.
    p = Prog(0, True, L=2, hkv=1, group=1, hd=2, sinks=3, recent=5, block=2, k=4, bits=0, stride=2, seqs=3,
             tokens=128, mq=4, policy_bytes=[])
    for _ in range(7):
        p.append(0, [(2, 20), (0, 3)])
        p.append(1, [(1, 17)])
    p.attend(0, [(2, [0, 1, 2, 3])])
    p.reconstruct(0, 2, 12)
    p.save("dense_identity")

    # Streaming, random int4 codec, capacity nearly exhausted.
    p = Prog(3, False, L=1, hkv=1, group=2, hd=6, sinks=4, recent=10, block=0, k=1, bits=4, stride=5, seqs=1,
             tokens=60, mq=1, policy_bytes=[4, 8], latent=4)
    for _ in range(3):
        p.append(0, [(0, 20)])
    p.attend(0, [(0, [0])])
    p.append(0, [(0, 1)])         # capacity error
    p.reconstruct(0, 0, 12)
    p.save("streaming_int4_full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
