#!/usr/bin/env bash
# Usage: scripts/generate.sh "a red circle on a blue background" out.png [json-extra]
# Submits a job with curl, polls until it ends, downloads image 0. IMAGEGEN_URL picks the server,
# IMAGEGEN_API_KEY is sent when set.
set -euo pipefail
prompt=${1:?usage: generate.sh PROMPT OUT.png [EXTRA_JSON e.g. '"seed":7']}
out=${2:?usage: generate.sh PROMPT OUT.png [EXTRA_JSON]}
extra=${3:-}
url=${IMAGEGEN_URL:-http://127.0.0.1:8000}
. "$(dirname "$0")/_submit.sh"
id=$(submit_job "$prompt" "$extra")
echo "job $id queued" >&2
for _ in $(seq 600); do
  state=$(curl -sS "${auth[@]}" "$url/jobs/$id" -w '\n%{http_code}') || { echo "cannot reach $url" >&2; exit 1; }
  code=${state##*$'\n'}
  state=${state%$'\n'*}
  if [ "$code" != 200 ]; then  # expired (410), unknown (404), key refused (401/403)...
    echo "job $id: HTTP $code: $state" >&2
    exit 1
  fi
  status=$(printf '%s' "$state" | python3 -c 'import json,sys; j=json.load(sys.stdin); p=j["progress"]; print(j["status"], p["step"], p["total"])')
  set -- $status
  case "$1" in
    succeeded) curl -sS --fail "${auth[@]}" -o "$out" "$url/jobs/$id/images/0"; echo "saved $out" >&2; exit 0 ;;
    failed|canceled) echo "job $id $1: $state" >&2; exit 1 ;;
    *) printf '\r%s %s/%s ' "$1" "$2" "$3" >&2; sleep 0.5 ;;
  esac
done
echo "timed out waiting for job $id" >&2
exit 1
