#!/usr/bin/env bash
# compare-llama: stpipe beside llama.cpp on the same file and threads, run side by side.
#
# usage: bench/compare-llama.sh --model FILE --llama-bench PATH [--pipeline RUN_DIR]
#                               [--rounds N] [-p N] [-n N] [--threads N] [--bin-dir DIR]
#
# This host's speed drifts by +-20% within minutes (other tenants), so one run of each engine
# proves little. Each round runs llama-bench (-r 1) and then `stpipe bench` (-r 1) on the same
# test, and prints both figures and their ratio; the summary gives the median of each engine
# and the median of the per-round ratios (the figure to quote). With --pipeline the stpipe side
# is a running pipeline (deploy/stpipe-up), else the in-process engine.
# llama-bench is not part of stpipe: build llama.cpp yourself (outside this tree) and pass it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR="$HERE/../build/bin"
MODEL="" LLAMA="" PIPE="" ROUNDS=5 PP=0 TG=128 THREADS=2
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2; shift ;;
    --llama-bench) LLAMA=$2; shift ;;
    --pipeline) PIPE=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -p) PP=$2; shift ;;
    -n) TG=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    --bin-dir) BIN_DIR=$2; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "compare-llama: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$MODEL" ] && [ -n "$LLAMA" ] || { echo "compare-llama: --model and --llama-bench are required" >&2; exit 2; }
if [ "$PP" -gt 0 ]; then TEST="pp$PP"; LARGS=(-p "$PP" -n 0); SARGS=(-p "$PP" -n 0)
else TEST="tg$TG"; LARGS=(-p 0 -n "$TG"); SARGS=(-p 0 -n "$TG"); fi
if [ -n "$PIPE" ]; then SIDE=(--pipeline "$PIPE" --model "$MODEL"); WHAT="pipeline $PIPE"
else SIDE=(--model "$MODEL" --threads "$THREADS"); WHAT="in-process, $THREADS threads"; fi

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
echo "model: $MODEL; test $TEST; stpipe $WHAT; llama-bench -t $THREADS"
echo
echo "| round | llama.cpp t/s | stpipe t/s | ratio |"
echo "|---:|---:|---:|---:|"
L=() S=() R=()
for i in $(seq 1 "$ROUNDS"); do
  l=$("$LLAMA" -m "$MODEL" -t "$THREADS" "${LARGS[@]}" -r 1 -o json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
  s=$("$BIN_DIR/stpipe" bench "${SIDE[@]}" "${SARGS[@]}" -r 1 --json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["tokens_per_second"])')
  r=$(python3 -c "print($s / $l)")
  L+=("$l") S+=("$s") R+=("$r")
  printf "| %d | %.2f | %.2f | %.2fx |\n" "$i" "$l" "$s" "$r"
done
python3 - "${L[*]}" "${S[*]}" "${R[*]}" <<'PY'
import statistics, sys
l, s, r = ([float(x) for x in a.split()] for a in sys.argv[1:4])
print(f"\nmedian: llama.cpp {statistics.median(l):.2f} t/s, stpipe {statistics.median(s):.2f} t/s; "
      f"median per-round ratio {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x)")
PY
