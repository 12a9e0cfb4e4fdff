#!/usr/bin/env python3
"""cpu_timeline: who holds each core while a pipeline decodes, from the kernel's scheduler
events, and how the expert workers' share of each layer starts and ends.

Why: a pipelined decode step hands the cores back and forth between processes (the attention
worker's team, then the expert workers, then the team again, every layer), and what it loses is
time a core sits idle or runs the wrong stage. Timers inside the stages cannot see that; the
scheduler's switch events can. This tool records them system-wide (`perf record -e
sched:sched_switch -a`, so perf must be allowed to: root or kernel.perf_event_paranoid <= -1)
while you run a benchmark, and prints:
  - each core's time by process (stage) and idle;
  - the share of time with both cores in each pair of states (attention/attention,
    experts/idle, ...): a core idle while the other runs one stage alone is what fixed placement
    or better hand-overs can win back;
  - per layer's expert phase (the workers' runs that overlap): the start skew (second worker's
    start minus the first's) and the end imbalance (last end minus first end), p50/p90/mean.

    bench/cpu_timeline.py --seconds 1 &   # then, at once:
    stpipe bench --pipeline RUN_DIR --model F -p 0 -n 256 -r 1

or on a recording made before: `bench/cpu_timeline.py --script FILE` (`perf script` output).
Stages are told apart by their command names (stpipe-attn-wor…, stpipe-expert-w…); anything else
is "other". The expert phase's "workers" are threads: with `--expert-threads` above 1 the skew
and imbalance compare threads of one worker too. Python 3 standard library and perf.
"""
import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile

SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+): sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+).*"
    r"==> next_comm=(.*?) next_pid=(\d+)")


def kind(comm):
    if comm.startswith("swapper"):
        return "idle"
    if comm.startswith("stpipe-attn"):
        return "attention"
    if comm.startswith("stpipe-expert"):
        return "experts"
    return "other"


def parse(lines):
    """[(t_us, cpu, prev 'comm:pid', next 'comm:pid')] in time order."""
    ev = []
    for line in lines:
        m = SWITCH.search(line)
        if m:
            ev.append((float(m.group(2)) * 1e6, int(m.group(1)), m.group(3) + ":" + m.group(4),
                       m.group(5) + ":" + m.group(6)))
    ev.sort()
    return ev


def occupancy(ev):
    """Per core {task: us}, and {(state of core a, state of core b): us} for the two lowest cores."""
    per = collections.defaultdict(lambda: collections.defaultdict(float))
    last = {}
    cur = {}
    pair = collections.defaultdict(float)
    cpus = sorted({c for _, c, _, _ in ev})[:2]
    lt = None
    for t, c, prev, nxt in ev:
        if lt is not None and len(cpus) == 2 and all(k in cur for k in cpus):
            pair[(kind(cur[cpus[0]]), kind(cur[cpus[1]]))] += t - lt
        if c in last:
            per[c][prev] += t - last[c]
        last[c] = t
        cur[c] = nxt
        lt = t
    return per, pair, cpus


def expert_phases(ev, gap_us=60.0):
    """Start skew and end imbalance of each layer's expert phase (runs of two or more workers
    that follow each other within gap_us)."""
    start, runs = {}, []
    for t, _, prev, nxt in ev:
        if prev in start:
            runs.append((start.pop(prev), t, prev))
        if nxt.startswith("stpipe-expert"):
            start[nxt] = t
    runs.sort()
    phases, cur = [], []
    for r in runs:
        if cur and r[0] - max(x[1] for x in cur) > gap_us:
            phases.append(cur)
            cur = []
        cur.append(r)
    if cur:
        phases.append(cur)
    skew, imb = [], []
    for p in phases:
        w = {}
        for s, e, who in p:
            a = w.setdefault(who, [s, e])
            a[0], a[1] = min(a[0], s), max(a[1], e)
        if len(w) < 2:
            continue
        starts = sorted(v[0] for v in w.values())
        ends = sorted(v[1] for v in w.values())
        skew.append(starts[-1] - starts[0])
        imb.append(ends[-1] - ends[0])
    return skew, imb


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def report(ev, out):
    if len(ev) < 2:
        print("cpu_timeline: no scheduler switch events (is perf allowed to trace?)", file=out)
        return 1
    span = ev[-1][0] - ev[0][0]
    per, pair, cpus = occupancy(ev)
    print("recorded %.0f ms, %d switches" % (span / 1e3, len(ev)), file=out)
    print("\n| core | task | share of the core |\n|---:|---|---:|", file=out)
    for c in sorted(per):
        tot = sum(per[c].values()) or 1.0
        for task, us in sorted(per[c].items(), key=lambda x: -x[1]):
            if us / tot >= 0.005:
                print("| %d | %s | %.1f%% |" % (c, task, 100 * us / tot), file=out)
    if pair:
        tot = sum(pair.values())
        print("\n| core %d | core %d | share of the time |\n|---|---|---:|" % tuple(cpus), file=out)
        for (a, b), us in sorted(pair.items(), key=lambda x: -x[1]):
            if us / tot >= 0.005:
                print("| %s | %s | %.1f%% |" % (a, b, 100 * us / tot), file=out)
    skew, imb = expert_phases(ev)
    if skew:
        print("\nexpert phases with two or more workers: %d" % len(skew), file=out)
        print("| us | p50 | p90 | mean |\n|---|---:|---:|---:|", file=out)
        for name, v in (("start skew", skew), ("end imbalance", imb)):
            print("| %s | %.0f | %.0f | %.1f |" % (name, pct(v, .5), pct(v, .9),
                                                  statistics.mean(v)), file=out)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="how long to record (default 1)")
    ap.add_argument("--script", help="read `perf script` output from FILE instead of recording")
    a = ap.parse_args()
    if a.script:
        with open(a.script, encoding="utf-8", errors="replace") as f:
            return report(parse(f), sys.stdout)
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "sched.data")
        rec = subprocess.run(["perf", "record", "-q", "-e", "sched:sched_switch", "-a", "-o", data,
                              "--", "sleep", str(a.seconds)], capture_output=True, text=True)
        if rec.returncode != 0:
            print("cpu_timeline: perf record failed: %s" % rec.stderr.strip(), file=sys.stderr)
            return 1
        scr = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,cpu,time,event,trace"],
                             capture_output=True, text=True)
        return report(parse(scr.stdout.splitlines()), sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
