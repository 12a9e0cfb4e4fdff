#!/usr/bin/env bash
# demo: sets up, builds and shows stpipe on a freshly generated tiny model, first in one process
# and then as the pipeline the project is built around (storage daemon, expert workers,
# attention worker, coordinator): it starts the pipeline, generates through it, prints the
# stages' statistics and stops it. The model has random weights, so its text is noise: the
# demo prints token ids and the text with every non-printable byte escaped.
# Usage: deploy/demo.sh   (installs Debian packages with sudo when not root)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cmake -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
work=$(mktemp -d "${TMPDIR:-/tmp}/stpipe-demo.XXXXXX")
run="$work/run"
trap '[ -f "$run/supervisor.pid" ] && deploy/stpipe-down "$run" >/dev/null 2>&1; rm -rf "$work"' EXIT
model="$work/tiny.gguf"
prompt="Hello world, the small model thinks"
build/bin/stpipe-genmodel --preset tiny --dtype q8_0 --seed 1 -o "$model" >/dev/null
build/bin/stpipe info --model "$model"

# printable text of the ids: the raw bytes of a random model's tokens with \xNN escapes
show() { # ids
    build/bin/stpipe detokenize --model "$model" --ids "$1" |
        python3 -c 'import sys; print(repr(sys.stdin.buffer.read())[2:-1])'
}

echo
echo "--- in one process: stpipe generate --model (random weights: the text is noise) ---"
ids=$(build/bin/stpipe generate --model "$model" --prompt "$prompt" -n 24 --ids --quiet)
echo "ids:  $ids"
echo "text: $(show "$ids")"

echo
echo "--- the pipeline: deploy/stpipe-up, 2 expert workers, memory budget 80M ---"
deploy/stpipe-up --model "$model" --run-dir "$run" --workers 2 --memory-budget 80M \
    --layout-dir "$work/layout"
pids=$(build/bin/stpipe generate --pipeline "$run" --prompt "$prompt" -n 24 --ids --quiet)
echo "ids:  $pids"
echo "text: $(show "$pids")"
if [ "$pids" = "$ids" ]; then
    echo "same ids as in one process (both with the default f16 KV cache)"
else
    echo "demo: the pipeline gave other ids than one process" >&2
    exit 1
fi
echo
echo "--- stpipe stats --run-dir (per-stage counters and latency percentiles) ---"
build/bin/stpipe stats --run-dir "$run"
deploy/stpipe-down "$run"
echo "pipeline stopped"
