#!/usr/bin/env bash
# Bring up a local Docker engine for the end-to-end tests (idempotent).
#
#   exit 0  the engine answers `docker info` (it already did, or we started it)
#   exit 1  it could not be started; the caller decides whether that is fatal
#           (the test suite then falls back to the local nats-server/redis binaries)
#
# Why these dockerd flags: no registry is reachable, so images are built locally and
# containers run with host networking bound to 127.0.0.1. `--bridge=none` means no docker0
# bridge and no private-range address for any container; `--iptables=false --ip-masq=false`
# keep the engine away from the host firewall. See DESIGN.md section 9.
#
# Environment knobs (all optional):
#   DOCKERD_LOG           where dockerd writes its log   (default /tmp/agentmesh-dockerd.log)
#   DOCKER_UP_TIMEOUT     seconds to wait for the engine (default 60)
set -uo pipefail

LOG="${DOCKERD_LOG:-/tmp/agentmesh-dockerd.log}"
TIMEOUT="${DOCKER_UP_TIMEOUT:-60}"

say() { printf '[docker-up] %s\n' "$*" >&2; }

banner() {
    cat >&2 <<EOF

###############################################################################
###                                                                         ###
###   DOCKER ENGINE COULD NOT BE STARTED                                    ###
###                                                                         ###
###   Reason: $1
###                                                                         ###
###   Tests that need containers will NOT use testcontainers; they will     ###
###   run against the local nats-server / redis-server binaries instead.    ###
###   dockerd log (if any): ${LOG}
###                                                                         ###
###############################################################################

EOF
    if [[ -s "$LOG" ]]; then
        say "last lines of ${LOG}:"
        tail -n 20 "$LOG" >&2
    fi
    exit 1
}

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

# pid of a live dockerd, from its pid file (no dependency on procps/pgrep).
dockerd_pid() {
    local pid
    pid="$(cat /var/run/docker.pid 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

# 1. Already running (local engine, DOCKER_HOST, CI service...): nothing to do.
if command -v docker >/dev/null 2>&1 && engine_up; then
    say "engine already reachable"
    exit 0
fi

# 2. Install the engine if it is missing. Debian's docker.io ships dockerd + containerd + runc.
if ! command -v dockerd >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        banner "dockerd is not installed and we are not root (cannot apt-get install docker.io)"
    fi
    command -v apt-get >/dev/null 2>&1 || banner "dockerd is not installed and apt-get is not available"
    say "installing docker.io with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package's postinst would start dockerd with its default flags (docker0 bridge,
    # iptables rules). Forbid service starts during the install unless a policy already exists;
    # we start the engine ourselves below with the flags we want.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # </dev/null: never wait for a prompt, even when a TTY is attached.
    if ! apt-get update -qq </dev/null >/dev/null; then
        banner "apt-get update failed"
    fi
    if ! apt-get install -y -qq --no-install-recommends docker.io </dev/null >/dev/null; then
        banner "apt-get install docker.io failed"
    fi
    command -v dockerd >/dev/null 2>&1 || banner "docker.io installed but dockerd is not on PATH"
fi

if [[ "$(id -u)" -ne 0 ]]; then
    banner "dockerd must be started as root (current uid $(id -u))"
fi

# 3. Start dockerd unless one is already running (e.g. a previous run still booting).
#    A stale pid file from a dead dockerd is ignored: dockerd removes it itself.
started_pid=""
if pid="$(dockerd_pid)"; then
    say "dockerd already running (pid ${pid}); waiting for its API"
else
    say "starting dockerd (log: ${LOG})"
    # setsid + nohup: detach from this shell and its session so the engine outlives the CI step.
    setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false \
        </dev/null >>"$LOG" 2>&1 &
    started_pid=$!
fi

# 4. Wait for the API.
deadline=$((SECONDS + TIMEOUT))
while ((SECONDS < deadline)); do
    if engine_up; then
        say "engine up after ${SECONDS}s: $(docker version --format 'server {{.Server.Version}}' 2>/dev/null)"
        exit 0
    fi
    # A dead child stays a zombie (kill -0 still succeeds), so look at its state too.
    if [[ -n "$started_pid" ]] && { ! kill -0 "$started_pid" 2>/dev/null ||
        grep -q '^State:[[:space:]]*Z' "/proc/${started_pid}/status" 2>/dev/null; }; then
        banner "dockerd exited during startup"
    fi
    sleep 1
done
banner "dockerd did not answer 'docker info' within ${TIMEOUT}s"
