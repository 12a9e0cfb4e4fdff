#!/usr/bin/env bash
# compare-llama: stpipe beside llama.cpp on the same file and threads, run side by side.
#
# usage: bench/compare-llama.sh --model FILE --llama-bench PATH [--pipeline RUN_DIR]
#                               [--rounds N] [-p N] [-n N] [-d LIST] [--threads N] [--bin-dir DIR]
#
# This host's speed drifts a lot within minutes (other tenants), so one run of each engine
# proves little. Each round runs llama-bench (-r 1) with flash attention off (-fa 0) and on
# (-fa 1), then `stpipe bench` (-r 1) on the same test, and prints the figures, the ratio of
# stpipe to the faster llama.cpp run of that round and the CPU steal % during the round
# (/proc/stat); the summary gives the median of each and the median of the per-round ratios
# (the figure to quote). The header gives the CPU and its read bandwidth (stpipe bench's test).
# -d LIST (default 0) repeats all of it at each context depth (llama-bench's -d: the test runs
# after a prompt of that many tokens, not counted). With --pipeline the stpipe side is a running
# pipeline (deploy/stpipe-up, whose context must hold the depth), else the in-process engine.
# Both engines run with their default KV cache: f16 (llama.cpp's -ctk/-ctv, stpipe's --cache-type).
# llama-bench is not part of stpipe: build llama.cpp yourself (outside this tree) and pass it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR="$HERE/../build/bin"
MODEL="" LLAMA="" PIPE="" ROUNDS=5 PP=0 TG=128 THREADS=2 DEPTHS=0
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift ;;
    --llama-bench) LLAMA=$2; shift ;;
    --pipeline) PIPE=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -p) PP=$2; shift ;;
    -n) TG=$2; shift ;;
    -d) DEPTHS=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    --bin-dir) BIN_DIR=$2; shift ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "compare-llama: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$MODEL" ] && [ -n "$LLAMA" ] || { echo "compare-llama: --model and --llama-bench are required" >&2; exit 2; }
if [ "$PP" -gt 0 ]; then TEST="pp$PP"; LARGS=(-p "$PP" -n 0); SARGS=(-p "$PP" -n 0)
else TEST="tg$TG"; LARGS=(-p 0 -n "$TG"); SARGS=(-p 0 -n "$TG"); fi
if [ -n "$PIPE" ]; then SIDE=(--pipeline "$PIPE" --model "$MODEL"); WHAT="pipeline $PIPE"
else SIDE=(--model "$MODEL" --threads "$THREADS"); WHAT="in-process, $THREADS threads"; fi

# the machine (the CPU's name, family and model: a hypervisor may give Zen 4 and Zen 5 hosts one
# name) and its read bandwidth, as stpipe bench prints them (the model is opened, nothing timed)
HOST=$("$BIN_DIR/stpipe" bench --model "$MODEL" --threads "$THREADS" -p 0 -n 0 2>/dev/null || true)
grep -m1 "^machine:" <<<"$HOST" || echo "machine: unknown ($(nproc) cores)"
echo "model: $MODEL; test $TEST; stpipe $WHAT; llama-bench -t $THREADS, -fa 0 and -fa 1"
grep -m1 "read bandwidth" <<<"$HOST" || echo "read bandwidth: not measured"
# steal and total jiffies of all CPUs (/proc/stat), for the share the hypervisor took per round
stat_now() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
SUMMARY=()
for D in ${DEPTHS//,/ }; do
  echo
  echo "depth $D"
  echo
  echo "| round | llama.cpp -fa 0 t/s | llama.cpp -fa 1 t/s | stpipe t/s | ratio to the faster | steal % |"
  echo "|---:|---:|---:|---:|---:|---:|"
  L0=() L1=() S=() R=()
  for i in $(seq 1 "$ROUNDS"); do
    st0=$(stat_now)
    l0=$("$LLAMA" -m "$MODEL" -t "$THREADS" "${LARGS[@]}" -d "$D" -fa 0 -r 1 -o json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
    l1=$("$LLAMA" -m "$MODEL" -t "$THREADS" "${LARGS[@]}" -d "$D" -fa 1 -r 1 -o json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
    s=$("$BIN_DIR/stpipe" bench "${SIDE[@]}" "${SARGS[@]}" -d "$D" -r 1 --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["tokens_per_second"])')
    r=$(python3 -c "print($s / max($l0, $l1))")
    steal=$(echo "$st0 $(stat_now)" | awk '{d = $4 - $2; printf "%.2f", (d > 0 ? 100 * ($3 - $1) / d : 0)}')
    L0+=("$l0") L1+=("$l1") S+=("$s") R+=("$r")
    printf "| %d | %.2f | %.2f | %.2f | %.2fx | %s |\n" "$i" "$l0" "$l1" "$s" "$r" "$steal"
  done
  SUMMARY+=("$(python3 - "$D" "${L0[*]}" "${L1[*]}" "${S[*]}" "${R[*]}" <<'PY'
import statistics, sys
d = sys.argv[1]
l0, l1, s, r = ([float(x) for x in a.split()] for a in sys.argv[2:6])
m = statistics.median
print(f"| {d} | {m(l0):.2f} | {m(l1):.2f} | {m(s):.2f} | {m(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |")
PY
)")
done
echo
echo "medians per depth ($TEST)"
echo
echo "| depth | llama.cpp -fa 0 | llama.cpp -fa 1 | stpipe | per-round ratio to the faster |"
echo "|---:|---:|---:|---:|---:|"
printf "%s\n" "${SUMMARY[@]}"
