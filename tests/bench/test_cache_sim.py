#!/usr/bin/env python3
"""test_cache_sim: bench/cache_sim.py on traces whose miss counts are worked out by hand, and
the ordering every trace must show (Belady never misses more than any online policy)."""
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import cache_sim as cs  # noqa: E402


def misses(lines, frames, policy, warmup=0, X=4, **kw):
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        seq = cs.flatten(cs.read_trace(f.name), X)
    finally:
        os.unlink(f.name)
    return cs.sim(seq, frames, policy, warmup, X, **kw)[0]


def main():
    # one layer, 4 experts, one expert per decision, 2 frames; uses 0 1 2 0 1 2.
    # lru misses all 6. Belady: 0 and 1 miss; 2 misses and evicts 1 (next used at 4, 0 at 3);
    # 0 hits; 1 misses and evicts 0 (never used again; 2 is used at 5); 2 hits: 4 misses.
    t = ["0 0", "0 1", "0 2", "0 0", "0 1", "0 2"]
    assert misses(t, 2, "lru") == 6, misses(t, 2, "lru")
    assert misses(t, 2, "opt") == 4, misses(t, 2, "opt")
    # a hot expert with cold ones in between: frequency does at least as well as recency
    t2 = ["0 0", "0 0", "0 0", "0 1", "0 2", "0 0", "0 3", "0 1", "0 0"]
    assert misses(t2, 2, "lfu", half_life=1e9) <= misses(t2, 2, "lru")
    # warm-up: decisions of the first tokens are replayed but not counted
    assert misses(t, 2, "lru", warmup=3) == 3
    # a decision's own experts are never evicted for each other (2 experts, 2 frames)
    assert misses(["0 0 1", "0 0 1"], 2, "lru") == 2
    # random skewed traces: opt <= every policy, and every policy misses at least the
    # distinct experts counted
    rng = random.Random(7)
    for _ in range(5):
        lines = []
        for tok in range(60):
            for layer in range(4):
                ex = sorted(rng.sample(range(8), 2) if rng.random() < 0.5 else
                            rng.sample(range(3), 2))
                lines.append(f"{layer} {ex[0]} {ex[1]}")
        opt = misses(lines, 12, "opt", X=8)
        for pol in ("lru", "lfu"):
            assert opt <= misses(lines, 12, pol, X=8), pol
    # the command line runs and prints a row per (frames, policy)
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "bench", "cache_sim.py"),
                          f.name, "--frames", "10,16", "--warmup", "4", "--disk-mbs", "1000"],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    rows = [r for r in out.splitlines() if r.split() and r.split()[0] in ("10", "16")]
    assert len(rows) == 8, out
    print(out)
    print("test_cache_sim: ok")


if __name__ == "__main__":
    main()
