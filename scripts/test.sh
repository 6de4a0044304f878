#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian 12 machine and run them all:
# lint (ruff), types (mypy), the test suites (unit, interop, system) and the
# benchmarks in one-shot mode.  Run as root for the namespace/interop tests
# (they skip on a laptop without root, but never under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> [${SECONDS}s] installing system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
        python3-venv iproute2 wireguard-tools wireguard-go iputils-ping procps pebble knot iptables \
        build-essential python3-dev libssl-dev buildah debootstrap nginx-light postgresql \
        wrk curl nghttp2-client golang-go golang-golang.zx2c4-wireguard-dev golang-gvisor-gvisor-dev \
        chromium >/dev/null  # chromium: the dashboard's browser tests (Playwright drives it)
    # fail2ban-regex checks deploy/fail2ban against the gateway's access log
    apt-get install -y -q --no-install-recommends fail2ban >/dev/null
fi

# The container images (tests/images.py) take minutes to build: with no pytest
# arguments given, build them now in the background, at the lowest CPU and I/O
# priority, while everything else installs and the first tests run; the tests that use
# them run last (tests/conftest.py) and wait for this build's exit status.
image_build_pid=
rekey_pid=
kill_tree() {  # a background job and everything it started
    local child
    for child in $(pgrep -P "$1" || true); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
cleanup() {
    [ -z "$rekey_pid" ] || kill_tree "$rekey_pid"
    [ -z "$image_build_pid" ] || kill_tree "$image_build_pid"
    [ -z "${KAKUREMICHI_TEST_IMAGE_BUILD:-}" ] || rm -rf "$KAKUREMICHI_TEST_IMAGE_BUILD"
}
trap cleanup EXIT
if [ "$#" = 0 ] && [ "$(id -u)" = 0 ] && command -v buildah >/dev/null; then
    KAKUREMICHI_TEST_IMAGE_BUILD=$(mktemp -d)
    export KAKUREMICHI_TEST_IMAGE_BUILD
    echo "==> [${SECONDS}s] building the container images in the background (log: $KAKUREMICHI_TEST_IMAGE_BUILD/log)"
    (
        status=0
        nice -n 19 ionice -c 3 scripts/build-image.sh --version-tag test agent control gateway \
            >"$KAKUREMICHI_TEST_IMAGE_BUILD/log" 2>&1 </dev/null || status=$?
        echo "$status" >"$KAKUREMICHI_TEST_IMAGE_BUILD/rc.tmp"
        mv "$KAKUREMICHI_TEST_IMAGE_BUILD/rc.tmp" "$KAKUREMICHI_TEST_IMAGE_BUILD/rc"
    ) &
    image_build_pid=$!
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> [${SECONDS}s] creating .venv"
    "$PY" -m venv .venv
fi
echo "==> [${SECONDS}s] installing kakuremichi with test extras"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[test]'
echo "==> [${SECONDS}s] installing the tests' OIDC provider (oidc-provider from the npm registry, tests/oidc)"
(cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)

export PATH="$PWD/.venv/bin:$PATH"
echo "==> [${SECONDS}s] ruff"
ruff check .
ruff format --check .
echo "==> [${SECONDS}s] mypy"
mypy
# The WireGuard rekey interop test spends 135 s mostly waiting for wireguard-go's timer:
# with no pytest arguments given it runs alone in the background, beside the main run
# (its namespaces and interfaces are named after its own PID), and is waited for below.
REKEY=tests/netstack/wireguard/test_interop.py::test_real_rekey_after_120_seconds
rekey_log=
if [ "$#" = 0 ]; then
    rekey_log=$(mktemp)
    echo "==> [${SECONDS}s] $REKEY, in the background"
    pytest -q -p no:cacheprovider "$REKEY" >"$rekey_log" 2>&1 &
    rekey_pid=$!
fi
echo "==> [${SECONDS}s] pytest (with coverage; pyproject.toml [tool.coverage] says what is measured)"
pytest -q -p no:cacheprovider --durations=15 --cov --cov-report= "$@" \
    ${rekey_pid:+--deselect "$REKEY"} tests
if [ -n "$rekey_pid" ]; then
    echo "==> [${SECONDS}s] waiting for $REKEY"
    status=0
    wait "$rekey_pid" || status=$?
    rekey_pid=
    cat "$rekey_log"
    rm -f "$rekey_log"
    [ "$status" = 0 ] || { echo "$REKEY failed (exit $status)"; exit "$status"; }
fi
echo "==> [${SECONDS}s] coverage of that run: lines of Python executed, per package and in total"
for package in agent common control gateway kakuremichi netstack; do
    echo "    $package $(coverage report --format=total --include="$package/*")%"
done
echo "    total $(coverage report --format=total)%"
echo "==> [${SECONDS}s] netstack again, on the pure-Python twin of the Cython hot path"
# (WireGuard's open_run/seal_run twins too; the wireguard-go interop runs once, above)
KAKUREMICHI_NETSTACK_PURE=1 pytest -q -p no:cacheprovider --durations=15 "$@" tests/netstack \
    --ignore=tests/netstack/wireguard/test_interop.py
echo "==> [${SECONDS}s] netstack, agent and gateway again, on uvloop (the main run uses asyncio's loop)"
KAKUREMICHI_TEST_EVENT_LOOP=uvloop pytest -q -p no:cacheprovider --durations=15 "$@" tests/netstack \
    --ignore=tests/netstack/wireguard
# (the stream transport's namespace test runs its programs as processes, on their own
# loop: once, in the main run)
# (test_system_netns.py is the same: its programs run as processes on their default loop,
# uvloop, in the main run already)
KAKUREMICHI_TEST_EVENT_LOOP=uvloop pytest -q -p no:cacheprovider --durations=15 "$@" tests/agent \
    --ignore=tests/agent/test_image.py --ignore=tests/agent/test_stream_netns.py \
    --ignore=tests/agent/test_system_netns.py
KAKUREMICHI_TEST_EVENT_LOOP=uvloop pytest -q -p no:cacheprovider --durations=15 "$@" tests/gateway
echo "==> [${SECONDS}s] benchmarks (one round each, to prove they run; scripts/bench.sh for numbers)"
pytest -q -p no:cacheprovider --durations=15 --benchmark-disable bench
echo "==> [${SECONDS}s] done"
