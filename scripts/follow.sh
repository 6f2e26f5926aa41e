#!/usr/bin/env bash
# Usage: scripts/follow.sh "a red circle on a blue background" [json-extra]
# Submits a job and follows its Server-Sent Events with curl until the terminal event
# (IMAGEGEN_URL picks the server, IMAGEGEN_API_KEY is sent when set).
set -euo pipefail
prompt=${1:?usage: follow.sh PROMPT [EXTRA_JSON e.g. '"seed":7']}
extra=${2:-}
url=${IMAGEGEN_URL:-http://127.0.0.1:8000}
. "$(dirname "$0")/_submit.sh"
id=$(submit_job "$prompt" "$extra")
echo "job $id" >&2
# -N: no buffering, so each event prints as it arrives; the server closes after the last one.
curl -sS -N "${auth[@]}" -H 'accept: text/event-stream' "$url/jobs/$id/events"
