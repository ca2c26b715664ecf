#!/usr/bin/env bash
# `make eval-local`: the starter golden set through the real mesh with the worker (and, with
# LOCAL_PLANNER=1, the planner) on the local model. A benchmark, not a gate: it prints the report,
# compares it with the recorded local baseline (tests/golden/local-baseline.json) and exits 0
# unless the mesh could not run. The scripted-model gate (`make eval`) stays CI's gate.
#   EVAL_LOCAL_ARGS="--case ID ..."   passed to meshctl eval
#   RECORD=1                          write the report as the new local baseline
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/mesh-on-local-model.sh"
fresh="${MESH_HOME:-$root/.mesh}/eval-local"
# A benchmark starts from nothing: a previous run's tasks, caches and ledger must not answer this one.
"$root/.venv/bin/meshctl" --home "$fresh" down >/dev/null 2>&1 || true
rm -rf "$fresh"
MESH_UP_ARGS="--tenants acme,globex" local_mesh_up "$fresh"
baseline="$root/tests/golden/local-baseline.json"
report="$home/local-report.json"
args=(--report "$report" --min-pass-rate 0 --timeout 600 --concurrency 2)
[ -f "$baseline" ] && [ "${RECORD:-0}" != 1 ] && args+=(--baseline "$baseline" --max-regression 1 \
  --max-cost-increase 1000 --max-latency-increase 1000)
SECONDS=0
rc=0
cd "$root"  # the report names the dataset by its path in the repository
"$root/.venv/bin/meshctl" --home "$home" eval tests/golden/starter.jsonl "${args[@]}" ${EVAL_LOCAL_ARGS:-} || rc=$?
echo "eval-local finished in ${SECONDS}s on $(grep -m1 -o 'model=[^ ]*' "$home/model.log" || echo 'the local model') (report: $report)"
[ "$rc" -le 1 ] || exit "$rc"  # the eval could not run (1 is a gate, which this benchmark does not apply)
if [ "${RECORD:-0}" = 1 ]; then cp "$report" "$baseline"; echo "recorded $baseline"; fi
