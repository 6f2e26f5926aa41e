#!/usr/bin/env bash
# Usage: scripts/follow.sh "a red circle on a blue background" [json-extra]
# Submits a job and follows its Server-Sent Events with curl until the terminal event
# (IMAGEGEN_URL picks the server, IMAGEGEN_API_KEY is sent when set; needs bash, curl and python3).
# A dropped stream is resumed with Last-Event-ID (5 times at most). Exit codes: see _submit.sh
# (0 succeeded, 1 unreachable/HTTP error/stream lost, 2 bad arguments, 3 failed, 4 canceled, 130 Ctrl-C).
set -euo pipefail
prompt=${1:?usage: follow.sh PROMPT [EXTRA_JSON e.g. '"seed":7']}
extra=${2:-}
url=${IMAGEGEN_URL:-http://127.0.0.1:8000}
# shellcheck source=_submit.sh
. "$(dirname "$0")/_submit.sh"
id=$(submit_job "$prompt" "$extra")
echo "job $id" >&2
last_id='' last_event='' retry_ms=1000 reconnects=0 max_reconnects=5

follow_once() {  # one events request: prints the events, sets $status (HTTP), $last_id and $last_event
  local line in_headers=1 ev='' eid='' err=''
  status=
  : >"$tmp/headers"
  # --suppress-connect-headers: through an HTTPS proxy, its "200 Connection established" is not the answer.
  set -- -sS -N -i --suppress-connect-headers -K "$tmp/curlrc" -H 'accept: text/event-stream'
  [ -z "$last_id" ] || set -- "$@" -H "last-event-id: $last_id"
  # -N: no buffering, so each event prints as it arrives; the server closes after the last one.
  # A stream silent for 30 s (keepalives come every 10 s) is dropped, and resumed.
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    if [ "$in_headers" = 1 ]; then
      case $line in
        HTTP/*) status=${line#* } && status=${status%% *} ;;
        '') case $status in 1*) ;; *) in_headers=0 ;; esac ;;
      esac
      printf '%s\n' "$line" >>"$tmp/headers"
      continue
    fi
    if [ "$status" != 200 ]; then err=$err$line$'\n'; continue; fi
    printf '%s\n' "$line"
    case $line in
      id:*) eid=${line#id:} && eid=${eid# } ;;
      event:*) ev=${line#event:} && ev=${ev# } ;;
      retry:*) line=${line//[!0-9]/} && [ -z "$line" ] || retry_ms=$((10#$line)) ;;
      '')  # dispatch
        [ -z "$eid" ] || last_id=$eid
        case $ev in '' | keepalive) ;; *) last_event=$ev ;; esac
        ev='' eid='' ;;
    esac
  done < <(curl "$@" -y 30 -Y 1 "$url/jobs/$id/events")
  if [ -n "$status" ] && [ "$status" != 200 ]; then printf '%s' "$err" >"$tmp/body"; fi
}

while :; do
  follow_once
  case $last_event in
    succeeded) exit 0 ;;
    failed) echo "job $id failed" >&2; exit 3 ;;
    canceled) echo "job $id canceled" >&2; exit 4 ;;
  esac
  case $status in
    '' | 200) ;;  # no answer, or the stream ended before the job did: resume below
    429 | 503) ;;
    *) echo "job $id: events: HTTP $status: $(cat "$tmp/body")" >&2; exit 1 ;;
  esac
  if [ "$reconnects" -ge "$max_reconnects" ]; then
    if [ -n "$status" ] && [ "$status" != 200 ]; then
      echo "job $id: events: HTTP $status: $(cat "$tmp/body")" >&2
    elif [ -z "$status" ]; then
      echo "cannot reach $url" >&2
    else
      echo "job $id: event stream lost after $reconnects reconnects" >&2
    fi
    exit 1
  fi
  reconnects=$((reconnects + 1))
  case $status in
    429 | 503) delay=$(retry_after) ;;
    *) delay=$((retry_ms / 1000)).$(printf '%03d' $((retry_ms % 1000))) ;;
  esac
  echo "job $id: events: reconnecting in ${delay}s ($reconnects/$max_reconnects)" >&2
  sleep "$delay"
done
