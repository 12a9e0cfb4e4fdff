#!/bin/sh
# Runs test_openai.mjs against `stpipe serve`: installs the `openai` npm package into a temp
# dir under $STP_TMP (never committed), then runs the script there. Exit 77 (ctest SKIP) when
# node/npm are missing or the install fails (no network).
set -u
here=$(cd "$(dirname "$0")" && pwd)
tmp=${STP_TMP:-/tmp}/openai-npm
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { echo "SKIP: node/npm not installed"; exit 77; }
mkdir -p "$tmp" || exit 1
cp "$here/package.json" "$here/test_openai.mjs" "$tmp/" || exit 1
if [ ! -d "$tmp/node_modules/openai" ]; then
  (cd "$tmp" && npm install --no-audit --no-fund --loglevel=error openai >npm.log 2>&1) || {
    echo "SKIP: npm install openai failed:"; tail -5 "$tmp/npm.log"; exit 77; }
fi
cd "$tmp" && exec node test_openai.mjs
