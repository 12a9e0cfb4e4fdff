#!/bin/sh
# Runs test_openai.mjs against `stpipe serve` with the `openai` npm client pinned by
# package-lock.json: `npm ci` into a scratch dir under $STP_TMP (node_modules is never
# committed; an install whose lock file matches is reused), then the script runs there.
# When node/npm are missing or the install fails: under CI=true the test FAILS (exit 1),
# otherwise it is skipped (exit 77, ctest SKIP_RETURN_CODE) with the reason on stdout.
set -u
here=$(cd "$(dirname "$0")" && pwd)
tmp=${STP_TMP:-/tmp}/openai-npm
cannot_run() {
    if [ "${CI:-}" = "true" ]; then
        echo "FAIL (CI=true, so not skipped): $1"
        exit 1
    fi
    echo "SKIP: openai_client: $1"
    exit 77
}
command -v node >/dev/null 2>&1 || cannot_run "node is not installed (deploy/setup.sh installs it)"
command -v npm >/dev/null 2>&1 || cannot_run "npm is not installed (deploy/setup.sh installs it)"
want=$(sed -n 's/.*"openai": "\([0-9.]*\)".*/\1/p' "$here/package.json")
[ -n "$want" ] || { echo "FAIL: package.json does not pin an exact openai version"; exit 1; }
mkdir -p "$tmp" || exit 1
cp "$here/test_openai.mjs" "$tmp/" || exit 1
have=$(cd "$tmp" && node -p "require('./node_modules/openai/package.json').version" 2>/dev/null)
if ! cmp -s "$here/package-lock.json" "$tmp/package-lock.json" || [ "$have" != "$want" ]; then
    cp "$here/package.json" "$here/package-lock.json" "$tmp/" || exit 1
    (cd "$tmp" && npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1) || {
        tail -5 "$tmp/npm.log"
        cannot_run "npm ci (openai $want from package-lock.json) failed, see $tmp/npm.log"
    }
    have=$(cd "$tmp" && node -p "require('./node_modules/openai/package.json').version")
fi
[ "$have" = "$want" ] || { echo "FAIL: installed openai $have, package-lock.json pins $want"; exit 1; }
echo "openai client $have (node $(node --version))"
cd "$tmp" && exec node test_openai.mjs
