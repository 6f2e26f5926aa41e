#!/usr/bin/env bash
# Start everything in the foreground: a private Redis (unless IMAGEGEN_REDIS_URL is set), one
# worker and the API on http://$IMAGEGEN_HOST:$IMAGEGEN_PORT. Ctrl-C stops all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DATA=${IMAGEGEN_DATA_DIR:-$PWD/.data}
HOST=${IMAGEGEN_HOST:-127.0.0.1}
PORT=${IMAGEGEN_PORT:-8000}
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)  # absolute: a relative one made `unix://.data/redis.sock`, which names no socket
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export IMAGEGEN_RESULTS_DIR=${IMAGEGEN_RESULTS_DIR:-$DATA/results}
export IMAGEGEN_MODEL_CACHE=${IMAGEGEN_MODEL_CACHE:-$DATA/models}
# Listening on loopback only: answer to loopback names only, so a web page whose name was pointed
# at 127.0.0.1 (DNS rebinding) cannot read or drive this keyless API.
case "$HOST" in
  127.*|localhost|::1) export IMAGEGEN_ALLOWED_HOSTS=${IMAGEGEN_ALLOWED_HOSTS:-localhost,127.0.0.1,::1} ;;
esac
# One worker on this machine: its torch threads may each keep a core (see IMAGEGEN_PIN_THREADS).
export IMAGEGEN_PIN_THREADS=${IMAGEGEN_PIN_THREADS:-true}

# Each process runs in a session of its own, so Ctrl-C reaches only this script, which stops
# them in order: the worker and the API first (the worker finishes its job or hands it back to
# the queue within IMAGEGEN_SHUTDOWN_GRACE, and needs Redis for that), then Redis. Ctrl-C used to
# reach Redis at once: the job being sampled could be neither recorded nor handed back.
services=()
redis_pid=""
stop() {
  set +e  # every step runs: a write to a terminal that hung up (SIGHUP) must not end the stopping
  trap - INT TERM HUP EXIT
  trap 'kill -KILL "${services[@]}" 2>/dev/null || true' INT  # a second Ctrl-C: no more waiting
  if [ ${#services[@]} -gt 0 ]; then
    echo "stopping (the worker hands back an unfinished job within ${IMAGEGEN_SHUTDOWN_GRACE:-30} s; Ctrl-C again to kill)" >&2
    kill -TERM "${services[@]}" 2>/dev/null || true
    for pid in "${services[@]}"; do wait "$pid" 2>/dev/null || true; done
  fi
  if [ -n "$redis_pid" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
}
trap stop INT TERM HUP EXIT

if [ -z "${IMAGEGEN_REDIS_URL:-}" ]; then
  # One private Redis per data folder: a second `make run` took over the first's socket, then removed it.
  exec 9>"$DATA/run.lock"
  if ! flock -n 9; then
    echo "another \`make run\` is using $DATA; stop it first, or give this one IMAGEGEN_DATA_DIR" >&2
    exit 1
  fi
  scripts/ensure-redis-server.sh
  sock="$DATA/redis.sock"
  # AOF with fsync every second: accepted jobs survive a crash of Redis itself.
  redis_args=(--dir "$DATA" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --save "")
  if [ ${#sock} -lt 100 ]; then
    setsid redis-server "${redis_args[@]}" --port 0 --unixsocket "$sock" --unixsocketperm 700 >"$DATA/redis.log" 2>&1 &
    export IMAGEGEN_REDIS_URL="unix://$sock"
    ping=(redis-cli -s "$sock" ping)
  else  # socket paths are limited to ~100 bytes; fall back to loopback TCP
    setsid redis-server "${redis_args[@]}" --port 6399 --bind 127.0.0.1 >"$DATA/redis.log" 2>&1 &
    export IMAGEGEN_REDIS_URL="redis://127.0.0.1:6399/0"
    ping=(redis-cli -p 6399 ping)
  fi
  redis_pid=$!
  for _ in $(seq 50); do "${ping[@]}" >/dev/null 2>&1 && break; sleep 0.1; done
  "${ping[@]}" >/dev/null || { echo "redis-server did not start; see $DATA/redis.log" >&2; exit 1; }
  echo "redis: $IMAGEGEN_REDIS_URL (data in $DATA)"
fi

setsid "$BIN/python" -m worker 9>&- &
services+=($!)
setsid "$BIN/uvicorn" app.main:app --host "$HOST" --port "$PORT" --no-access-log 9>&- &
services+=($!)
echo "imagegen: http://$HOST:$PORT (model ${IMAGEGEN_MODEL:-tiny-shapes}); Ctrl-C stops everything"
# Stop all when any one of them exits.
wait -n
