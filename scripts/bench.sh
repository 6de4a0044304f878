#!/usr/bin/env bash
# Run the benchmarks for real numbers (medians; see README "Benchmarks").
# Sizes: KAKUREMICHI_BENCH_CLIENTS (default here 10000), KAKUREMICHI_BENCH_GATEWAYS (1000).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export KAKUREMICHI_BENCH_CLIENTS=${KAKUREMICHI_BENCH_CLIENTS:-10000}
export KAKUREMICHI_BENCH_GATEWAYS=${KAKUREMICHI_BENCH_GATEWAYS:-1000}
mkdir -p .benchmarks
pytest -p no:cacheprovider bench "$@" \
    --benchmark-columns=min,median,max,rounds \
    --benchmark-json=.benchmarks/latest.json
python3 - <<'PY'
import json
data = json.load(open(".benchmarks/latest.json"))
for bench in data["benchmarks"]:
    extra = {k: v for k, v in bench["extra_info"].items() if k != "rounds_ms"}
    print(f"{bench['name']}: median {bench['stats']['median'] * 1000:.2f} ms  {extra}")
PY
