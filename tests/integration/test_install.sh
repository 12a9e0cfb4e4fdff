#!/usr/bin/env bash
# test_install.sh: stpipe installed like a service, checked from the installed files only.
#   tree: `cmake --install` the test's build directory into a scratch prefix; the layout
#         (programs and scripts in bin/, data in share/stpipe, docs in share/doc/stpipe, the
#         systemd unit naming this prefix's stpipe-up, verified by systemd-analyze when present);
#         then, with nothing from the build or source tree on hand (STP_BIN_DIR unset, PATH =
#         the prefix's bin + /usr/bin:/bin, cwd = scratch): stpipe-genmodel writes a tiny model,
#         stpipe-up starts a pipeline whose every stage is an installed program, stpipe generate
#         --pipeline gives the in-process greedy ids, stpipe-down leaves no process, socket or
#         /dev/shm/<prefix>-* segment; the same for the unit's ExecStart (expanded as systemd
#         does, with the example conf's variables) stopped by SIGTERM to stpipe-up alone.
#   deb:  `cpack -G DEB` into scratch; the package declares the runtime libraries' Debian
#         packages and holds the programs, scripts, data and the unit with /usr/bin/stpipe-up.
# Environment (tests/CMakeLists.txt): STP_BINARY_DIR, STP_TMP, STP_CMAKE, STP_CPACK.
# Exit 0 pass, 1 fail, 77 skipped (a missing tool; under CI=true that is a failure instead).
set -u
MODE=${1:-tree}
B=${STP_BINARY_DIR:?STP_BINARY_DIR: the build directory}
mkdir -p "${STP_TMP:?}"
S=$(mktemp -d "$STP_TMP/install-$MODE.XXXXXX")
P=$S/prefix
# shellcheck disable=SC2317  # (the EXIT trap)
cleanup() { # a failed check leaves a pipeline running: stop it (stpipe-down also kills stages)
    local d
    for d in "$S/run" "$S/rt/stpipe/check"; do
        [ -f "$d/pids" ] && "$P/bin/stpipe-down" "$d" >/dev/null 2>&1
    done
    rm -rf "$S"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
skip() {
    if [ "${CI:-}" = true ]; then fail "$* (CI=true: a test that cannot run fails)"; fi
    echo "SKIP: $*"; exit 77
}
# wait_gone PID...: every pid has exited within 10 s
wait_gone() {
    local t p alive
    for ((t = 0; t < 100; t++)); do
        alive=
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && return 0
        sleep 0.1
    done
    fail "still running 10 s after stpipe-down:$alive"
}

PROGRAMS="stpipe stpipe-coordinator stpipe-attn-worker stpipe-expert-worker stpipe-storage-daemon"
PROGRAMS="$PROGRAMS stpipe-genmodel stpipe-up stpipe-down stpipe-membench stpipe-pss"

if [ "$MODE" = deb ]; then
    command -v dpkg-deb >/dev/null || skip "dpkg-deb not found"
    [ -x "${STP_CPACK:-}" ] || skip "cpack not found"
    "$STP_CPACK" -G DEB --config "$B/CPackConfig.cmake" -B "$S/pkg" >"$S/cpack.log" 2>&1 ||
        { cat "$S/cpack.log" >&2; fail "cpack -G DEB failed"; }
    DEB=
    for f in "$S"/pkg/stpipe_*.deb; do [ -f "$f" ] && DEB=$f; done
    [ -n "$DEB" ] || { cat "$S/cpack.log" >&2; fail "no stpipe_*.deb in $S/pkg"; }
    DEPENDS=$(dpkg-deb -f "$DEB" Depends)
    echo "Depends: $DEPENDS"
    for lib in libzmq5 libprotobuf-c1 libnuma1 libpcre2-8-0 libutf8proc2 liburing2 libjansson4 \
        libmicrohttpd12 libc6 bash; do
        echo ", $DEPENDS," | grep -Eq "[ ,]$lib( \\(|,)" || fail "Depends lacks $lib: $DEPENDS"
    done
    dpkg-deb -c "$DEB" | awk '{print $NF}' >"$S/files"
    for f in $PROGRAMS; do grep -qx "./usr/bin/$f" "$S/files" || fail ".deb lacks /usr/bin/$f"; done
    for f in ./usr/lib/systemd/system/stpipe@.service ./usr/share/stpipe/example.conf \
        ./usr/share/stpipe/membench-prompts/1-prose.txt ./usr/share/doc/stpipe/README.md \
        ./usr/share/doc/stpipe/deploy/README.md; do
        grep -qx "$f" "$S/files" || fail ".deb lacks $f"
    done
    grep -E '^\./usr/bin/.' "$S/files" | grep -vE '/stpipe(-[a-z-]+)?$' && fail ".deb installs a non-stpipe program"
    dpkg-deb -x "$DEB" "$S/x"
    grep -q '^ExecStart=/usr/bin/stpipe-up --foreground ' "$S/x/usr/lib/systemd/system/stpipe@.service" ||
        fail "the packaged unit does not run /usr/bin/stpipe-up --foreground"
    echo "PASS: $(basename "$DEB"): $(wc -l <"$S/files") entries"
    exit 0
fi

[ "$MODE" = tree ] || fail "usage: test_install.sh tree|deb"
[ -x "${STP_CMAKE:-}" ] || skip "cmake not found"
"$STP_CMAKE" --install "$B" --prefix "$P" >"$S/install.log" 2>&1 ||
    { cat "$S/install.log" >&2; fail "cmake --install failed"; }

# ---- the layout ----
for f in $PROGRAMS; do [ -x "$P/bin/$f" ] || fail "bin/$f not installed"; done
for f in "$P"/bin/*; do
    f=${f##*/}
    case " $PROGRAMS " in *" $f "*) ;; *) fail "bin/$f installed (not a user program)" ;; esac
done
for f in share/stpipe/example.conf share/stpipe/membench-prompts/1-prose.txt \
    share/stpipe/membench-prompts/4-multiturn.chatml share/doc/stpipe/README.md \
    share/doc/stpipe/docs/ARCHITECTURE.md share/doc/stpipe/deploy/README.md \
    share/doc/stpipe/deploy/systemd/README.md lib/systemd/system/stpipe@.service; do
    [ -s "$P/$f" ] || fail "$f not installed"
done
UNIT=$P/lib/systemd/system/stpipe@.service
grep -q "^ExecStart=$P/bin/stpipe-up --foreground " "$UNIT" ||
    fail "the installed unit does not run $P/bin/stpipe-up: $(grep ExecStart "$UNIT")"
if command -v systemd-analyze >/dev/null; then
    # an instance of the template, as systemctl would load it (the instance's conf need not exist)
    cp "$UNIT" "$S/stpipe@check.service"
    systemd-analyze verify "$S/stpipe@check.service" >"$S/verify.log" 2>&1 ||
        { cat "$S/verify.log" >&2; fail "systemd-analyze verify rejected the unit"; }
    [ -s "$S/verify.log" ] && { cat "$S/verify.log" >&2; fail "systemd-analyze verify warned"; }
    echo "systemd-analyze verify: clean"
else
    echo "note: systemd-analyze not found, the unit is not verified"
fi

# ---- a pipeline from the installed files only ----
cd "$S" || fail "cd $S"
run() { env -u STP_BIN_DIR -u STP_SOURCE_DIR -u STP_TEST_DATA PATH="$P/bin:/usr/bin:/bin" "$@"; }
run stpipe-genmodel --preset tiny -o "$S/tiny.gguf" >"$S/genmodel.log" 2>&1 ||
    { cat "$S/genmodel.log" >&2; fail "installed stpipe-genmodel failed"; }
run stpipe-up --model "$S/tiny.gguf" --run-dir "$S/run" --layout-dir "$S/layout" --timeout 60 \
    --owner-pid $$ >"$S/up.log" 2>&1 || { cat "$S/up.log" "$S/run/supervisor.log" >&2; fail "installed stpipe-up failed"; }
SUP=$(cat "$S/run/supervisor.pid")
PREFIX=$(cat "$S/run/shm_prefix")
[ -n "$PREFIX" ] || fail "no shm prefix in the run directory"
tr '\0' ' ' <"/proc/$SUP/cmdline" | grep -qF " $P/bin/stpipe-up " ||
    fail "the supervisor is not the installed stpipe-up: $(tr '\0' ' ' <"/proc/$SUP/cmdline")"
PIDS=()
NSTAGE=0
while read -r name pid; do
    exe=$(readlink "/proc/$pid/exe") || fail "stage $name (pid $pid) is not running"
    case $exe in "$P"/bin/stpipe-*) ;; *) fail "stage $name runs $exe, not an installed program" ;; esac
    PIDS+=("$pid")
    NSTAGE=$((NSTAGE + 1))
done <"$S/run/pids"
[ "$NSTAGE" -ge 4 ] || fail "$NSTAGE stages in run/pids, expected storage, expert(s), attn, coordinator"

PROMPT="1 2 3 4 5"
run stpipe generate --pipeline "$S/run" --prompt-ids "$PROMPT" -n 8 --ids --quiet --ignore-eos \
    >"$S/pipe.ids" 2>"$S/pipe.err" || { cat "$S/pipe.err" >&2; fail "installed stpipe generate --pipeline failed"; }
run stpipe generate --model "$S/tiny.gguf" --prompt-ids "$PROMPT" -n 8 --ids --quiet --ignore-eos \
    >"$S/local.ids" 2>"$S/local.err" || { cat "$S/local.err" >&2; fail "installed stpipe generate --model failed"; }
N=$(wc -w <"$S/pipe.ids")
[ "$N" -eq 8 ] || fail "the pipeline generated $N ids, not 8: $(cat "$S/pipe.ids")"
[ "$(cat "$S/pipe.ids")" = "$(cat "$S/local.ids")" ] ||
    fail "pipeline ids '$(cat "$S/pipe.ids")' != in-process ids '$(cat "$S/local.ids")'"
echo "pipeline ids: $(cat "$S/pipe.ids")"

run stpipe-down "$S/run" || fail "installed stpipe-down failed"
wait_gone "$SUP" "${PIDS[@]}"
left=
for f in /dev/shm/"$PREFIX"-*; do [ -e "$f" ] && left="$left $f"; done
[ -z "$left" ] || fail "/dev/shm segments left after stpipe-down: $left"
ls "$S/run"/*.sock >/dev/null 2>&1 && fail "sockets left in the run directory"

# ---- the unit's ExecStart, run as systemd would run it for an instance "check": the specifiers
# and the conf's variables expanded (${X}: one word, even empty; $X: split), run directory made
# (RuntimeDirectory), stopped by SIGTERM to stpipe-up alone (KillMode=mixed) ----
EXEC=$(sed -n 's/^ExecStart=//p' "$UNIT")
for v in $(grep -o '\$[{]\{0,1\}[A-Z_]*' <<<"$EXEC" | tr -d '$' | tr -d '{'); do
    grep -q "^$v=" "$P/share/stpipe/example.conf" || fail "the example conf does not set $v (ExecStart uses it)"
done
STP_MODEL=$S/tiny.gguf STP_MEMORY_BUDGET='' STP_OPTIONS="--timeout 60 --owner-pid $$"
ARGV=()
read -ra WORDS <<<"$EXEC"
# shellcheck disable=SC2016  # the words are matched literally
for w in "${WORDS[@]}"; do
    w=${w//%t/$S/rt}
    w=${w//%C/$S/cache}
    w=${w//%i/check}
    case $w in
    '${STP_MODEL}') ARGV+=("$STP_MODEL") ;;
    '${STP_MEMORY_BUDGET}') ARGV+=("$STP_MEMORY_BUDGET") ;;
    '$STP_OPTIONS') read -ra o <<<"$STP_OPTIONS"; ARGV+=("${o[@]}") ;;
    *'$'*) fail "ExecStart word '$w' uses a variable this test does not know" ;;
    *) ARGV+=("$w") ;;
    esac
done
RD=$S/rt/stpipe/check
mkdir -p "$RD" "$S/cache/stpipe/check"
chmod 700 "$RD"
# exec: $! is stpipe-up itself, the unit's main process
(exec env -u STP_BIN_DIR -u STP_SOURCE_DIR -u STP_TEST_DATA PATH="$P/bin:/usr/bin:/bin" "${ARGV[@]}") \
    >"$S/unit.log" 2>&1 &
SUP=$!
for ((t = 0; t < 600; t++)); do
    [ -f "$RD/up.ready" ] && break
    kill -0 "$SUP" 2>/dev/null || { cat "$S/unit.log" >&2; fail "the unit's ExecStart exited during start-up"; }
    sleep 0.1
done
[ -f "$RD/up.ready" ] || { cat "$S/unit.log" >&2; fail "the unit's pipeline not ready within 60 s"; }
PREFIX=$(cat "$RD/shm_prefix")
PIDS=()
while read -r _ pid; do PIDS+=("$pid"); done <"$RD/pids"
run stpipe generate --pipeline "$RD" --prompt-ids "$PROMPT" -n 8 --ids --quiet --ignore-eos \
    >"$S/unit.ids" 2>"$S/unit.err" || { cat "$S/unit.err" >&2; fail "generate through the unit's pipeline failed"; }
[ "$(cat "$S/unit.ids")" = "$(cat "$S/local.ids")" ] ||
    fail "the unit's pipeline gave '$(cat "$S/unit.ids")', not '$(cat "$S/local.ids")'"
kill -TERM "$SUP"
wait "$SUP"
rc=$?
[ "$rc" -eq 0 ] || fail "stpipe-up --foreground exited $rc on SIGTERM (Restart=on-failure would restart it)"
wait_gone "${PIDS[@]}"
left=
for f in /dev/shm/"$PREFIX"-*; do [ -e "$f" ] && left="$left $f"; done
[ -z "$left" ] || fail "/dev/shm segments left after SIGTERM to the unit's stpipe-up: $left"
ls "$RD"/*.sock >/dev/null 2>&1 && fail "sockets left in the unit's run directory"
echo "PASS: installed tree in $P ran a pipeline of $NSTAGE stages (stpipe-up/-down and the unit's"
echo "      ExecStart + SIGTERM) and left nothing behind"
exit 0
