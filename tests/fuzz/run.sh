#!/usr/bin/env bash
# run.sh: runs one libFuzzer target for a bounded time (the ctest entry and deploy/fuzz.sh).
# Usage: run.sh BINARY FUZZ_DIR SECONDS WORK_DIR [--keep-corpus]
#   1. replays FUZZ_DIR/crashes/<target>/* (committed reproducers: each must now pass);
#   2. fuzzes for SECONDS from WORK_DIR/<target>/corpus (seeded from FUZZ_DIR/corpus/<target>;
#      emptied first unless --keep-corpus), crash artifacts in WORK_DIR/<target>/artifacts/.
# Prints "fuzz: <target> executions=N crashes=M seconds=S" and exits 1 on any crash.
set -uo pipefail
bin=$1 fuzz_dir=$2 secs=$3 work=$4 keep=${5:-}
target=$(basename "$bin")
dir="$work/$target"
if [[ "$keep" != "--keep-corpus" ]]; then rm -rf "$dir"; fi
mkdir -p "$dir/corpus" "$dir/artifacts"
cp -n "$fuzz_dir/corpus/$target"/* "$dir/corpus/" 2>/dev/null || true

opts=(-rss_limit_mb=2048 -max_len=65536 -timeout=30 -print_final_stats=1)
[[ -f "$fuzz_dir/$target.dict" ]] && opts+=("-dict=$fuzz_dir/$target.dict")

shopt -s nullglob
repros=("$fuzz_dir/crashes/$target"/*)
if ((${#repros[@]})); then
  if ! "$bin" "${opts[@]}" "${repros[@]}" >"$dir/replay.log" 2>&1; then
    echo "fuzz: $target: a committed reproducer fails again:"
    tail -n 40 "$dir/replay.log"
    echo "fuzz: $target executions=0 crashes=1 seconds=0"
    exit 1
  fi
  echo "fuzz: $target: ${#repros[@]} reproducer(s) in crashes/$target pass"
fi

"$bin" "${opts[@]}" -max_total_time="$secs" -artifact_prefix="$dir/artifacts/" "$dir/corpus" \
  >"$dir/fuzz.log" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/fuzz.log" | tail -n 1)
[[ -z "$execs" ]] && execs=$(grep -o '^#[0-9]*' "$dir/fuzz.log" | tail -n 1 | tr -d '#')
arts=("$dir/artifacts"/crash-* "$dir/artifacts"/leak-* "$dir/artifacts"/timeout-* \
  "$dir/artifacts"/oom-*)
ncrash=${#arts[@]}
if ((rc != 0 && ncrash == 0)); then ncrash=1; fi
echo "fuzz: $target executions=${execs:-0} crashes=$ncrash seconds=$secs corpus=$(ls "$dir/corpus" | wc -l)"
if ((ncrash)); then
  grep -m1 -A40 -E 'ERROR: |check failed|runtime error' "$dir/fuzz.log" || tail -n 40 "$dir/fuzz.log"
  for a in "${arts[@]}"; do echo "fuzz: reproducer $a"; done
  exit 1
fi
exit 0
