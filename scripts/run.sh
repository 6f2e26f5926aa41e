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
  127.*|localhost|::1) export IMAGEGEN_ALLOWED_HOSTS=${IMAGEGEN_ALLOWED_HOSTS:-localhost,127.0.0.1,::1,$HOST} ;;
esac
# One worker on this machine: its torch threads may each keep a core (see IMAGEGEN_PIN_THREADS).
export IMAGEGEN_PIN_THREADS=${IMAGEGEN_PIN_THREADS:-true}

# Each process runs in a session of its own, so Ctrl-C reaches only this script, which stops
# them in order: the worker and the API first (the worker's job gets IMAGEGEN_SHUTDOWN_GRACE to
# finish, then goes back to the queue when the denoising step under way ends, and the worker
# needs Redis for that), then Redis. Ctrl-C used to reach Redis at once: the job being sampled
# could be neither recorded nor handed back.
services=()
redis_pid=""
sock_dir=""
stop() {
  set +e  # every step runs: a write to a terminal that hung up (SIGHUP) must not end the stopping
  trap - INT TERM HUP EXIT
  trap 'kill -KILL "${services[@]}" 2>/dev/null || true' INT  # a second Ctrl-C: no more waiting
  if [ ${#services[@]} -gt 0 ]; then
    echo "stopping: a job being sampled gets ${IMAGEGEN_SHUTDOWN_GRACE:-30} s to finish, then goes back to the queue" \
      "at the end of its current denoising step (Ctrl-C again to kill)" >&2
    kill -TERM "${services[@]}" 2>/dev/null || true
    for pid in "${services[@]}"; do wait "$pid" 2>/dev/null || true; done
  fi
  if [ -n "$redis_pid" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  if [ -n "$sock_dir" ]; then rm -rf "$sock_dir"; fi
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
  # A Unix socket only (no TCP port that another Redis could hold): in the data folder, or, where
  # that path is too long for a socket (~100 bytes), in a private folder of its own under /tmp.
  sock="$DATA/redis.sock"
  if [ ${#sock} -ge 100 ]; then
    sock_dir=$(mktemp -d /tmp/imagegen-redis.XXXXXX)  # mode 700
    sock="$sock_dir/redis.sock"
  fi
  # AOF with fsync every second: accepted jobs survive a crash of Redis itself.
  setsid redis-server --dir "$DATA" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --save "" \
    --port 0 --unixsocket "$sock" --unixsocketperm 700 >"$DATA/redis.log" 2>&1 &
  redis_pid=$!
  export IMAGEGEN_REDIS_URL="unix://$sock"
  for _ in $(seq 50); do
    redis-cli -s "$sock" ping >/dev/null 2>&1 && break
    kill -0 "$redis_pid" 2>/dev/null || break  # it exited: no use waiting
    sleep 0.1
  done
  if ! kill -0 "$redis_pid" 2>/dev/null || ! redis-cli -s "$sock" ping >/dev/null 2>&1; then
    echo "redis-server did not start; see $DATA/redis.log:" >&2
    tail -n 5 "$DATA/redis.log" >&2
    exit 1
  fi
  echo "redis: $IMAGEGEN_REDIS_URL (data in $DATA)"
fi

setsid "$BIN/python" -m worker 9>&- &
services+=($!)
setsid "$BIN/uvicorn" app.main:app --host "$HOST" --port "$PORT" --no-access-log 9>&- &
services+=($!)
echo "imagegen: http://$HOST:$PORT (model ${IMAGEGEN_MODEL:-tiny-shapes}); Ctrl-C stops everything"
# Stop all when any one of them exits.
wait -n
