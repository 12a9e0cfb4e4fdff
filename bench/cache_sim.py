#!/usr/bin/env python3
"""cache_sim: replays a storage daemon's decode decisions (--trace-decisions FILE) through
expert-cache policies at several pool sizes and prints demand misses and MB read per token.

The replay itself is C (bench/cache_replay.c over common/cache, the daemon's own policy code):
this script runs it and formats its lines, so what it reports is what the daemon would do.

It answers what no run can: how many bytes per token the best possible policy still has to
read at a given pool size. `opt` is Belady's clairvoyant policy (evict the expert whose next use
is farthest away), a lower bound for every real policy without prefetching; with the disk's
read rate it bounds decode tok/s from above: tok/s <= disk MB/s / (MB/token).

usage: cache_sim.py TRACE --frames N[,N...] [--expert-mb MB] [--warmup TOKENS] [--disk-mbs MB/s]
                    [--n-expert X] [--half-life TOKENS] [--policies lru,lfu,pin,opt]
                    [--replay PATH]
  TRACE        lines "layer expert expert ...", one per decode decision (layer 0 starts a token)
  --frames     pool slots to simulate (the daemon logs its count: "pool ...: N of M experts")
  --expert-mb  bytes of one expert record (default 2.06: the 4b preset in Q4_0)
  --warmup     tokens replayed before counting (default 32, as stpipe-membench)
  --disk-mbs   disk read rate for the tok/s bound (default: not printed)
  --half-life  lfu's half-life in tokens (default 32, the daemon's)
  --replay     the cache_replay program (default: $STP_BIN_DIR/cache_replay, else build/bin/)
Policies: lru (the daemon's `--cache-policy lru`), lfu (the daemon's default: decayed use
count, ties by recency), pin (the experts most used over the whole trace pinned, the rest of
the pool LRU: a clairvoyant static split), opt (Belady).
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def replay_path(given=None):
    if given:
        return given
    if os.environ.get("STP_BIN_DIR"):
        return os.path.join(os.environ["STP_BIN_DIR"], "cache_replay")
    return os.path.join(HERE, "..", "build", "bin", "cache_replay")


def replay(trace, frames, policies, warmup=32, half_life=32, n_expert=0, exe=None):
    """Runs cache_replay: ((tokens, layers, experts, uses), [(frames, policy, misses, counted)])."""
    cmd = [replay_path(exe), trace, "--frames", ",".join(str(f) for f in frames),
           "--policies", ",".join(policies), "--warmup", str(warmup),
           "--half-life", str(half_life), "--n-expert", str(n_expert)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip() or f"{cmd[0]} exited {out.returncode}")
    head, rows = None, []
    for line in out.stdout.splitlines():
        f = line.split()
        if f[0] == "trace":
            head = tuple(int(x) for x in f[1:])
        else:
            rows.append((int(f[0]), f[1], int(f[2]), int(f[3])))
    return head, rows


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
    ap.add_argument("--replay")
    a = ap.parse_args()
    frames = [int(x) for x in a.frames.split(",")]
    try:
        (n_tok, n_layer, X, uses), rows = replay(a.trace, frames, a.policies.split(","), a.warmup,
                                                 a.half_life, a.n_expert, a.replay)
    except (RuntimeError, OSError) as e:
        print(f"cache_sim: {e}", file=sys.stderr)
        return 1
    per_tok = uses / max(1, n_tok)
    print(f"trace {a.trace}: {n_tok} tokens, {n_layer} layers x {X} experts, "
          f"{per_tok:.1f} expert uses per token; warm-up {a.warmup} tokens")
    hdr = f"{'frames':>7} {'policy':>6} {'miss/tok':>9} {'hit %':>7} {'MB/tok':>8}"
    if a.disk_mbs:
        hdr += f" {'tok/s bound':>12}"
    print(hdr)
    for nf, pol, m, nt in rows:
        mpt = m / max(1, nt)
        line = (f"{nf:>7} {pol:>6} {mpt:>9.2f} {100 * (1 - mpt / per_tok):>7.1f} "
                f"{mpt * a.expert_mb:>8.1f}")
        if a.disk_mbs:
            line += f" {a.disk_mbs / max(1e-9, mpt * a.expert_mb):>12.1f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
