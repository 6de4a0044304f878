#!/usr/bin/env bash
# Set up kakuremichi on a fresh machine and run what exists today on loopback:
# Control (REST API + WebSocket hub, SQLite), managed with the admin CLI.
# Rootless; everything lives in .venv and a temporary data directory.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/kakuremichi ]; then
    echo "==> creating .venv and installing kakuremichi"
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e .
fi
export PATH="$PWD/.venv/bin:$PATH"

DATA=$(mktemp -d)
PORT=${KAKUREMICHI_DEMO_PORT:-7700}
export KAKUREMICHI_ADMIN_TOKEN="adm_demo_$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
export KAKUREMICHI_CONTROL_URL="http://127.0.0.1:$PORT"

echo "==> starting Control on 127.0.0.1:$PORT (data in $DATA)"
kakuremichi control --host 127.0.0.1 --port "$PORT" --data-dir "$DATA" &
CONTROL=$!
trap 'kill -TERM $CONTROL 2>/dev/null; wait $CONTROL 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1])" \
        "$KAKUREMICHI_CONTROL_URL/healthz" 2>/dev/null && break
    sleep 0.1
done

echo "==> kakuremichi admin agent create laptop"
kakuremichi admin agent create laptop
echo "==> kakuremichi admin gateway create edge-1"
kakuremichi admin gateway create edge-1
echo "==> kakuremichi admin tunnel create --domain app.example.com --agent laptop --target 127.0.0.1:8080"
kakuremichi admin tunnel create --domain app.example.com --agent laptop --target 127.0.0.1:8080
echo "==> kakuremichi admin tunnel list"
kakuremichi admin tunnel list
echo "==> the REST API (OpenAPI at $KAKUREMICHI_CONTROL_URL/openapi.json)"
python3 - <<'PY'
import json, os, urllib.request
request = urllib.request.Request(
    os.environ["KAKUREMICHI_CONTROL_URL"] + "/api/agents",
    headers={"Authorization": "Bearer " + os.environ["KAKUREMICHI_ADMIN_TOKEN"]},
)
print(json.dumps(json.load(urllib.request.urlopen(request)), indent=2))
PY
echo "==> stopping Control (SIGTERM: WebSockets get 1001 going-away)"
