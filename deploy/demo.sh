#!/usr/bin/env bash
# Sets up, builds and runs a demo generation on a freshly generated tiny model.
# Usage: deploy/demo.sh   (installs Debian packages with sudo when not root)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cmake -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
model="${TMPDIR:-/tmp}/stpipe-demo-tiny.gguf"
build/bin/stpipe-genmodel --preset tiny --dtype q8_0 --seed 1 -o "$model"
build/bin/stpipe info --model "$model"
echo "--- generating (random weights: the text is noise, the pipeline is real) ---"
build/bin/stpipe generate --model "$model" --prompt "Hello world, the small model thinks" -n 32
