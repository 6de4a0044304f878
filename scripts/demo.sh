#!/usr/bin/env bash
# The one-machine demo on a fresh machine: installs kakuremichi into .venv, then runs
# `kakuremichi demo` (Control + gateway with user-space WireGuard + agent + a sample
# app, all on 127.0.0.1, nothing as root), sends a real curl through the tunnel, and
# stops everything.  To keep the demo running instead: .venv/bin/kakuremichi demo
#
# Environment: PYTHON (interpreter for the venv), KAKUREMICHI_DEMO_HTTP_PORT (8080),
# KAKUREMICHI_DEMO_CONTROL_PORT (7700).  As root on Debian it installs the system
# packages it needs first (python3-venv, a C compiler for the Cython module, curl).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing system packages (python3-venv, build-essential, python3-dev, libssl-dev, curl)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends \
        python3-venv build-essential python3-dev libssl-dev curl ca-certificates >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/kakuremichi ]; then
    echo "==> creating .venv and installing kakuremichi (compiles the Cython hot path)"
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e .
fi

HTTP_PORT=${KAKUREMICHI_DEMO_HTTP_PORT:-8080}
CONTROL_PORT=${KAKUREMICHI_DEMO_CONTROL_PORT:-7700}
LOG=$(mktemp)
RUN_AS=()
DROP=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && id nobody >/dev/null 2>&1 &&
    "${DROP[@]}" env HOME=/tmp .venv/bin/python -c 'import kakuremichi' 2>/dev/null; then
    # the demo needs no privileges: prove it by dropping them
    chmod 0644 "$LOG"
    chown nobody "$LOG"
    RUN_AS=("${DROP[@]}")
    echo "==> running as user nobody (no privileges needed)"
fi

echo "==> kakuremichi demo (log: $LOG)"
${RUN_AS[@]+"${RUN_AS[@]}"} env HOME=/tmp .venv/bin/python -m kakuremichi.cli demo \
    --http-port "$HTTP_PORT" --control-port "$CONTROL_PORT" >"$LOG" 2>&1 &
DEMO=$!
trap 'kill -TERM $DEMO 2>/dev/null || true; wait $DEMO 2>/dev/null || true; rm -f "$LOG"' EXIT

for _ in $(seq 600); do
    grep -q '^Try:' "$LOG" && break
    if ! kill -0 $DEMO 2>/dev/null; then
        echo "the demo exited early:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.1
done
grep -q '^Try:' "$LOG" || { echo "the demo did not come up within 60 s:" >&2; cat "$LOG" >&2; exit 1; }
sed -n '/^kakuremichi demo is up/,/^  kakuremichi admin/p' "$LOG"

echo
echo "==> curl -sS -H 'Host: demo.localhost' http://127.0.0.1:$HTTP_PORT/"
curl -sS --fail-with-body --max-time 10 -H 'Host: demo.localhost' "http://127.0.0.1:$HTTP_PORT/"
echo "==> curl -sS -H 'Host: demo.localhost' http://127.0.0.1:$HTTP_PORT/headers"
curl -sS --fail-with-body --max-time 10 -H 'Host: demo.localhost' "http://127.0.0.1:$HTTP_PORT/headers"
echo
echo "==> stopping the demo (SIGTERM)"
kill -TERM $DEMO
wait $DEMO
echo "==> done: the request went curl -> gateway -> WireGuard (user space) -> agent -> app"
