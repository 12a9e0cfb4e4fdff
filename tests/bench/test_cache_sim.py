#!/usr/bin/env python3
"""test_cache_sim: bench/cache_sim.py runs the C replay (bench/cache_replay over common/cache,
the storage daemon's policy code; its own C tests are tests/unit/test_cache_policy.c): the misses
it reports on a hand-worked trace, Belady's bound over random traces, the table of the command
line, and a bad trace reported as an error."""
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import cache_sim as cs  # noqa: E402


def run(lines, frames, policies, warmup=0, X=4, half_life=32):
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        return {(fr, p): m for fr, p, m, _ in
                cs.replay(f.name, frames, policies, warmup, half_life, X)[1]}
    finally:
        os.unlink(f.name)


def main():
    # one layer, 4 experts, one expert per decision, 2 frames; uses 0 1 2 0 1 2.
    # lru misses all 6. Belady: 0 and 1 miss; 2 misses and evicts 1 (next used at 4, 0 at 3);
    # 0 hits; 1 misses and evicts 0 (never used again; 2 is used at 5); 2 hits: 4 misses.
    t = ["0 0", "0 1", "0 2", "0 0", "0 1", "0 2"]
    r = run(t, [2], ["lru", "opt"])
    assert r[(2, "lru")] == 6 and r[(2, "opt")] == 4, r
    # warm-up: decisions of the first tokens are replayed but not counted
    assert run(t, [2], ["lru"], warmup=3)[(2, "lru")] == 3
    # a hot expert among cold ones: frequency beats recency (hand-worked: 5 against 7)
    t2 = ["0 0", "0 0", "0 0", "0 1", "0 2", "0 0", "0 3", "0 1", "0 0"]
    r = run(t2, [2], ["lru", "lfu"], half_life=1e9)
    assert r[(2, "lru")] == 7 and r[(2, "lfu")] == 5, r
    # random skewed traces: opt <= every policy
    rng = random.Random(7)
    for _ in range(3):
        lines = []
        for tok in range(60):
            for layer in range(4):
                ex = sorted(rng.sample(range(8), 2) if rng.random() < 0.5 else
                            rng.sample(range(3), 2))
                lines.append(f"{layer} {ex[0]} {ex[1]}")
        r = run(lines, [12], ["lru", "lfu", "pin", "opt"], X=8)
        for pol in ("lru", "lfu", "pin"):
            assert r[(12, "opt")] <= r[(12, pol)], (pol, r)
    # the command line prints a row per (frames, policy)
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "bench", "cache_sim.py"),
                          f.name, "--frames", "10,16", "--warmup", "4", "--disk-mbs", "1000"],
                         capture_output=True, text=True, check=True).stdout
    rows = [r for r in out.splitlines() if r.split() and r.split()[0] in ("10", "16")]
    assert len(rows) == 8, out
    print(out)
    # a bad trace: an error, exit 1
    with open(f.name, "w") as g:
        g.write("0 1\n0 x\n")
    bad = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "bench", "cache_sim.py"),
                          f.name, "--frames", "4"], capture_output=True, text=True)
    os.unlink(f.name)
    assert bad.returncode == 1 and "line 2" in bad.stderr, bad
    print("test_cache_sim: ok")


if __name__ == "__main__":
    main()
