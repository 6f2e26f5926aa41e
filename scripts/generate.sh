#!/usr/bin/env bash
# Usage: scripts/generate.sh "a red circle on a blue background" out.png [json-extra]
# Submits a job with curl, long-polls until it ends, downloads image 0. IMAGEGEN_URL picks the server,
# IMAGEGEN_API_KEY is sent when set. Needs bash, curl and python3. Exit codes: see _submit.sh
# (0 saved, 1 unreachable/HTTP error/timed out, 2 bad arguments, 3 failed, 4 canceled, 130 Ctrl-C).
set -euo pipefail
prompt=${1:?usage: generate.sh PROMPT OUT.png [EXTRA_JSON e.g. '"seed":7']}
out=${2:?usage: generate.sh PROMPT OUT.png [EXTRA_JSON]}
extra=${3:-}
url=${IMAGEGEN_URL:-http://127.0.0.1:8000}
# shellcheck source=_submit.sh
. "$(dirname "$0")/_submit.sh"
id=$(submit_job "$prompt" "$extra")
echo "job $id queued" >&2
deadline=$((SECONDS + 600))
while [ "$SECONDS" -lt "$deadline" ]; do
  # ?wait=2: answers as soon as the job ends, else its state (progress) after 2 s.
  http_call --max-time 30 "$url/jobs/$id?wait=2" || { echo "cannot reach $url" >&2; exit 1; }
  state=$(cat "$tmp/body")
  if [ "$code" != 200 ]; then  # expired (410), unknown (404), key refused (401/403), still busy (429/503)...
    echo "job $id: HTTP $code: $state" >&2
    exit 1
  fi
  status=$(printf '%s' "$state" | python3 -c 'import json,sys; j=json.load(sys.stdin); p=j["progress"]; print(j["status"], p["step"], p["total"])')
  read -r status step total <<<"$status"
  case $status in
    succeeded)
      http_call --max-time 300 "$url/jobs/$id/images/0" || { echo "cannot reach $url" >&2; exit 1; }
      if [ "$code" != 200 ]; then echo "job $id: image 0: HTTP $code: $(cat "$tmp/body")" >&2; exit 1; fi
      mv -f "$tmp/body" "$out"
      echo "saved $out" >&2
      exit 0 ;;
    failed) echo "job $id failed: $state" >&2; exit 3 ;;
    canceled) echo "job $id canceled: $state" >&2; exit 4 ;;
    *) printf '\r%s %s/%s ' "$status" "$step" "$total" >&2 ;;
  esac
done
echo "timed out waiting for job $id" >&2
exit 1
