# Sourced by generate.sh and follow.sh. submit_job PROMPT EXTRA_JSON: POST /generate on $url and
# print the job id; on a refusal print the server's error (HTTP status and message) and exit 1.
# With IMAGEGEN_API_KEY set, every request carries it (`auth`, for the scripts' curl calls).
auth=()
if [ -n "${IMAGEGEN_API_KEY:-}" ]; then auth=(-H "authorization: Bearer $IMAGEGEN_API_KEY"); fi

submit_job() {
  local body answer code
  body=$(python3 -c 'import json,sys; d={"prompt": sys.argv[1]}; d.update(json.loads("{"+sys.argv[2]+"}")); print(json.dumps(d))' \
    "$1" "$2" 2>/dev/null) || { echo "not JSON fields: {$2} (e.g. '\"seed\":7')" >&2; exit 2; }
  answer=$(curl -sS "${auth[@]}" -XPOST "$url/generate" -H 'content-type: application/json' -d "$body" -w '\n%{http_code}') ||
    { echo "cannot reach $url (set IMAGEGEN_URL?)" >&2; exit 1; }
  code=${answer##*$'\n'}
  answer=${answer%$'\n'*}
  if [ "$code" != 200 ] && [ "$code" != 202 ]; then
    echo "refused (HTTP $code): $answer" >&2
    exit 1
  fi
  printf '%s' "$answer" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
