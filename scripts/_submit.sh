# shellcheck shell=bash
# Sourced by generate.sh and follow.sh (needs bash 3.2+, curl and python3, for JSON).
# submit_job PROMPT EXTRA_JSON: POST /generate on $url and print the job id; on a refusal print the
# server's error (HTTP status and message) and exit 1. http_call CURL_ARGS...: one request, its body in
# $tmp/body and status in $code, 429/503 retried after Retry-After. With IMAGEGEN_API_KEY set, every
# request carries it, from a private curl config file (`curlrc`), never on a command line.
# Exit codes: 0 done, 1 server unreachable or an HTTP error, 2 bad arguments or no python3,
# 3 job failed, 4 job canceled, 130 interrupted (the job is canceled first).
if ! command -v python3 >/dev/null 2>&1; then
  echo "$(basename "$0") needs python3 (to read and write JSON); install it or put it on PATH" >&2
  exit 2
fi
while [ "${url%/}" != "$url" ]; do url=${url%/}; done # IMAGEGEN_URL=http://host:8000/ made //generate
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imagegen.XXXXXX") # mode 700: the key's file is private
trap 'rm -rf "$tmp"' EXIT
{
  echo 'connect-timeout = 10'
  if [ -n "${IMAGEGEN_API_KEY:-}" ]; then
    key=${IMAGEGEN_API_KEY//\\/\\\\}
    printf 'header = "authorization: Bearer %s"\n' "${key//\"/\\\"}" # printf: a builtin, no argv
  fi
} >"$tmp/curlrc"
retries=5 # 429/503 answers retried, after Retry-After (at most 60 s each)
id=

on_interrupt() { # Ctrl-C or TERM: cancel the job this script submitted, then exit 130
  trap - INT TERM
  if [ -n "$id" ]; then
    printf '\ninterrupted: canceling job %s\n' "$id" >&2
    curl -sS -K "$tmp/curlrc" --max-time 10 -o /dev/null -XDELETE "$url/jobs/$id" || true
  fi
  exit 130
}
trap on_interrupt INT TERM

retry_after() { # the last Retry-After in $tmp/headers as seconds: 1 when absent or a date, at most 60
  local line s=
  while IFS= read -r line; do
    case $line in [Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr]:*)
      s=${line#*:} && s=${s//[[:space:]]/}
      case $s in *[!0-9]*) s= ;; esac ;; # an HTTP date: 1, as for none
    esac
  done <"$tmp/headers"
  if [ -z "$s" ]; then echo 1; elif [ ${#s} -gt 2 ] || [ $((10#$s)) -gt 60 ]; then echo 60; else echo $((10#$s)); fi
}

http_call() {
  local tries=0 delay
  while :; do
    code=$(curl -sS -K "$tmp/curlrc" -D "$tmp/headers" -o "$tmp/body" -w '%{http_code}' "$@") || return 1
    case $code in 429 | 503) ;; *) return 0 ;; esac
    [ "$tries" -lt "$retries" ] || return 0
    delay=$(retry_after)
    tries=$((tries + 1))
    echo "HTTP $code: retrying in ${delay}s ($tries/$retries)" >&2
    sleep "$delay"
  done
}

submit_job() {
  local body
  body=$(python3 -c 'import json,sys; d={"prompt": sys.argv[1]}; d.update(json.loads("{"+sys.argv[2]+"}")); print(json.dumps(d))' \
    "$1" "$2" 2>/dev/null) || { echo "not JSON fields: {$2} (e.g. '\"seed\":7')" >&2; exit 2; }
  http_call --max-time 60 -XPOST "$url/generate" -H 'content-type: application/json' -d "$body" ||
    { echo "cannot reach $url (set IMAGEGEN_URL?)" >&2; exit 1; }
  if [ "$code" != 200 ] && [ "$code" != 202 ]; then
    echo "refused (HTTP $code): $(cat "$tmp/body")" >&2
    exit 1
  fi
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$tmp/body"
}
