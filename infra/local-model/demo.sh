#!/usr/bin/env bash
# `make demo-local`: the demo with the worker's steps answered by a small model on this machine's CPU,
# offline (llama-cpp-python behind infra/local-model/serve.py, OpenAI-compatible). See
# mesh-on-local-model.sh for LOCAL_MODEL and LOCAL_PLANNER; calls fall back to the scripted model
# if the local server fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/mesh-on-local-model.sh"
local_mesh_up "${MESH_HOME:-$root/.mesh}/demo-local"
goal="${GOAL:-How does AgentMesh avoid duplicate side effects?}"
rc=0
"$root/.venv/bin/meshctl" --home "$home" submit "$goal" --follow --timeout 300 || rc=$?
exit $rc
