#!/usr/bin/env python3
"""cache_sim: replays a storage daemon's decode decisions (--trace-decisions FILE) through
expert-cache policies at several pool sizes and prints demand misses and MB read per token.

It answers what no run can: how many bytes per token the best possible policy still has to
read at a given pool size. `opt` is Belady's clairvoyant policy (evict the expert whose next use
is farthest away), a lower bound for every real policy without prefetching; with the disk's
read rate it bounds decode tok/s from above: tok/s <= disk MB/s / (MB/token).

usage: cache_sim.py TRACE --frames N[,N...] [--expert-mb MB] [--warmup TOKENS] [--disk-mbs MB/s]
                    [--n-expert X] [--half-life TOKENS] [--policies lru,lfu,pin,opt]
  TRACE        lines "layer expert expert ...", one per decode decision (layer 0 starts a token)
  --frames     pool slots to simulate (the daemon logs its count: "pool ...: N of M experts")
  --expert-mb  bytes of one expert record (default 2.06: the 4b preset in Q4_0)
  --warmup     tokens replayed before counting (default 32, as stpipe-membench)
  --disk-mbs   disk read rate for the tok/s bound (default: not printed)
  --half-life  lfu's half-life in tokens (default 32, the daemon's)
Policies: lru (the daemon's `--cache-policy lru`), lfu (the daemon's default: decayed use
count, ties by recency), pin (the experts most used over the whole trace pinned, the rest of
the pool LRU: a clairvoyant static split), opt (Belady).
"""
import argparse
import collections
import math
import sys


def read_trace(path):
    toks, cur = [], None
    for line in open(path):
        f = line.split()
        if not f:
            continue
        layer, experts = int(f[0]), [int(x) for x in f[1:]]
        if layer == 0 or cur is None:
            cur = []
            toks.append(cur)
        cur.append((layer, experts))
    return toks


def flatten(toks, X):
    """(token index, entries) per decision; entry = layer * X + expert."""
    seq = []
    for t, decs in enumerate(toks):
        for layer, experts in decs:
            seq.append((t, [layer * X + e for e in experts]))
    return seq


def sim(seq, frames, policy, warmup, X, half_life=32, pins=()):
    resident = set()
    last = {}
    freq, ftick = collections.defaultdict(float), {}
    pinned = set(pins)
    # next-use index per position for opt
    nxt = None
    if policy == "opt":
        nxt = [dict() for _ in seq]
        upcoming = {}
        for i in range(len(seq) - 1, -1, -1):
            nxt[i] = {e: upcoming.get(e, math.inf) for e in seq[i][1]}
            for e in seq[i][1]:
                upcoming[e] = i
        next_of = {}  # entry -> its next use index as of now
    misses = 0
    tokens_counted = set()
    # per decision, as the daemon: its tick counts decisions, n_layer of them per token
    n_layer = 1 + max(e // X for _, need in seq for e in need)
    decay = 2.0 ** (-1.0 / (half_life * n_layer))
    for i, (t, need) in enumerate(seq):
        count = t >= warmup
        if count:
            tokens_counted.add(t)
        for e in need:
            if policy == "lfu":
                age = i - ftick.get(e, i)
                freq[e] = freq[e] * decay ** age + 1.0
                ftick[e] = i
            last[e] = i
            if policy == "opt":
                next_of[e] = nxt[i][e]
            if e in resident:
                continue
            if count:
                misses += 1
            if len(resident) >= frames:
                cands = [r for r in resident if r not in need and r not in pinned]
                if not cands:
                    cands = [r for r in resident if r not in need]
                if policy == "opt":
                    v = max(cands, key=lambda r: (next_of.get(r, math.inf), -last[r]))
                elif policy == "lfu":
                    v = min(cands, key=lambda r: (freq[r] * decay ** (i - ftick[r]), last[r]))
                else:
                    v = min(cands, key=lambda r: last[r])
                resident.discard(v)
            resident.add(e)
    return misses, len(tokens_counted)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--frames", required=True)
    ap.add_argument("--expert-mb", type=float, default=2.06)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--disk-mbs", type=float, default=0)
    ap.add_argument("--n-expert", type=int, default=0)
    ap.add_argument("--policies", default="lru,lfu,pin,opt")
    ap.add_argument("--half-life", type=float, default=32)
    a = ap.parse_args()
    toks = read_trace(a.trace)
    X = a.n_expert or 1 + max(e for d in toks for _, es in d for e in es)
    seq = flatten(toks, X)
    uses = collections.Counter(e for _, need in seq for e in need)
    n_layer = 1 + max(layer for d in toks for layer, _ in d)
    per_tok = sum(len(n) for _, n in seq) / len(toks)
    print(f"trace {a.trace}: {len(toks)} tokens, {n_layer} layers x {X} experts, "
          f"{per_tok:.1f} expert uses per token, {len(uses)} distinct experts used; "
          f"warm-up {a.warmup} tokens")
    hdr = f"{'frames':>7} {'policy':>6} {'miss/tok':>9} {'hit %':>7} {'MB/tok':>8}"
    if a.disk_mbs:
        hdr += f" {'tok/s bound':>12}"
    print(hdr)
    for frames in [int(x) for x in a.frames.split(",")]:
        for pol in a.policies.split(","):
            pins = ()
            if pol == "pin":  # the most used experts fill all but one layer's worth of slots
                pins = [e for e, _ in uses.most_common(max(0, frames - X))]
            m, nt = sim(seq, frames, "lru" if pol == "pin" else pol, a.warmup, X,
                        half_life=a.half_life, pins=pins)
            mpt = m / max(1, nt)
            line = (f"{frames:>7} {pol:>6} {mpt:>9.2f} {100 * (1 - mpt / per_tok):>7.1f} "
                    f"{mpt * a.expert_mb:>8.1f}")
            if a.disk_mbs:
                line += f" {a.disk_mbs / max(1e-9, mpt * a.expert_mb):>12.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
