#!/usr/bin/env python3
"""test_cpu_timeline: bench/cpu_timeline.py on a hand-worked `perf script` trace of two cores
(two layers: attention on both cores, then the two expert workers, one starting 20 us late, one
ending 30 us early), checked against the shares, skews and imbalances worked out by hand; and an
empty trace answered with an error, not a crash."""
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import cpu_timeline as ct  # noqa: E402

A0, A1 = "stpipe-attn-wor 10", "stpipe-attn-wor 11"
W0, W1 = "stpipe-expert-w 20", "stpipe-expert-w 21"
IDLE0, IDLE1 = "swapper/0 0", "swapper/1 0"


def sw(cpu, t_us, prev, nxt):
    pc, pp = prev.split()
    nc, np_ = nxt.split()
    return ("%s %s [%03d] %.6f: sched:sched_switch: prev_comm=%s prev_pid=%s prev_prio=120 "
            "prev_state=S ==> next_comm=%s next_pid=%s next_prio=120"
            % (pc, pp, cpu, t_us / 1e6, pc, pp, nc, np_))


def trace():
    """Two layers, from t0 = 1000 and 2000 us: attention on both cores for 400 us; then core 0
    runs W0 for 300 us and idles, core 1 idles 20 us, runs W1 for 310 us and idles; the next
    layer starts 1000 us after the first, and the trace ends at 3000."""
    lines = []
    for k in range(2):
        t = 1000.0 + 1000 * k
        lines += [sw(0, t, IDLE0, A0), sw(1, t, IDLE1, A1),
                  sw(0, t + 400, A0, W0), sw(1, t + 400, A1, IDLE1),
                  sw(1, t + 420, IDLE1, W1),
                  sw(0, t + 700, W0, IDLE0), sw(1, t + 730, W1, IDLE1)]
    lines.append(sw(0, 3000.0, IDLE0, A0))
    lines.append(sw(1, 3000.0, IDLE1, A1))
    return lines


def main():
    ev = ct.parse(trace())
    assert len(ev) == 16, len(ev)
    per, pair, cpus = ct.occupancy(ev)
    assert cpus == [0, 1]
    # core 0 over 1000..3000: A0 400+400, W0 300+300, idle 300+300
    assert abs(per[0]["stpipe-attn-wor:10"] - 800) < 1e-6
    assert abs(per[0]["stpipe-expert-w:20"] - 600) < 1e-6
    assert abs(per[0]["swapper/0:0"] - 600) < 1e-6
    # core 1: A1 800, idle 20+270 each layer, W1 310 each layer
    assert abs(per[1]["stpipe-expert-w:21"] - 620) < 1e-6
    assert abs(per[1]["swapper/1:0"] - 580) < 1e-6
    # both cores: attention/attention 400 a layer; experts/idle 20 (core 1 late); experts/experts
    # 280; idle/experts 30 (core 0 done early); idle/idle 270
    want = {("attention", "attention"): 800, ("experts", "idle"): 40,
            ("experts", "experts"): 560, ("idle", "experts"): 60, ("idle", "idle"): 540}
    for k, us in want.items():
        assert abs(pair[k] - us) < 1e-6, (k, pair[k], us)
    assert abs(sum(pair.values()) - 2000) < 1e-6
    skew, imb = ct.expert_phases(ev)
    assert [round(x) for x in skew] == [20, 20], skew
    assert [round(x) for x in imb] == [30, 30], imb

    out = io.StringIO()
    assert ct.report(ev, out) == 0
    text = out.getvalue()
    assert "| experts | idle | 2.0% |" in text, text
    assert "| start skew | 20 | 20 | 20.0 |" in text, text
    assert "| end imbalance | 30 | 30 | 30.0 |" in text, text

    out = io.StringIO()
    assert ct.report(ct.parse(["not a trace line"]), out) == 1
    assert "no scheduler switch events" in out.getvalue()
    print("test_cpu_timeline: ok")


if __name__ == "__main__":
    main()
