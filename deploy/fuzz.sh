#!/usr/bin/env bash
# fuzz.sh: runs one libFuzzer target (tests/fuzz/) for a given time and prints the executions
# and crashes found. Builds build-fuzz with clang first if needed (and rebuilds changed code).
# Usage: deploy/fuzz.sh TARGET SECONDS        TARGET: fuzz_gguf | fuzz_tokenizer | fuzz_msg | all
# The working corpus persists in build-fuzz/fuzz-work/TARGET/corpus (seeded from
# tests/fuzz/corpus/TARGET), so repeated runs continue where the last one stopped; crash
# reproducers land in build-fuzz/fuzz-work/TARGET/artifacts/ (commit the ones worth keeping to
# tests/fuzz/crashes/TARGET/ once fixed: every run replays them first).
# Environment: STP_FUZZ_BUILD (default build-fuzz), NICE (default 19).
set -euo pipefail
case "${1:-}" in -h | --help) echo "usage: deploy/fuzz.sh TARGET SECONDS   (TARGET: fuzz_gguf fuzz_tokenizer fuzz_msg all)"; exit 0 ;; esac
cd "$(dirname "$0")/.."
if (($# != 2)); then
  echo "usage: deploy/fuzz.sh TARGET SECONDS   (TARGET: fuzz_gguf fuzz_tokenizer fuzz_msg all)" >&2
  exit 2
fi
target=$1 secs=$2
build=${STP_FUZZ_BUILD:-build-fuzz}
nice_level=${NICE:-19}
case "$target" in
  all) targets=(fuzz_gguf fuzz_tokenizer fuzz_msg) ;;
  fuzz_gguf | fuzz_tokenizer | fuzz_msg) targets=("$target") ;;
  *) echo "fuzz.sh: unknown target '$target'" >&2; exit 2 ;;
esac
command -v clang >/dev/null || { echo "fuzz.sh: clang not found (deploy/setup.sh --with-clang)" >&2; exit 2; }

if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Release -DSTP_FUZZ=ON \
    >/dev/null
fi
if ! nice -n "$nice_level" cmake --build "$build" -j2 --target "${targets[@]}" \
  >"$build/fuzz-build.log" 2>&1; then
  grep -E 'error' "$build/fuzz-build.log" | head -n 20 >&2
  exit 1
fi

export STP_TEST_DATA=${STP_TEST_DATA:-$PWD/tests/data}
status=0
for t in "${targets[@]}"; do
  nice -n "$nice_level" tests/fuzz/run.sh "$build/fuzz/$t" tests/fuzz "$secs" "$build/fuzz-work" \
    --keep-corpus || status=1
done
exit $status
