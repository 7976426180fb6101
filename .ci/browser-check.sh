#!/usr/bin/env bash
# Flower in a real browser, run by hand (CI installs no browser):
#   start the simulator, one worker and `docq flower` with credentials; run a small job;
#   check that Flower refuses a request without credentials (401); load the tasks page in
#   headless Chromium with credentials, check that the job's tasks are listed, and save a
#   screenshot; then open the page of a batch whose chunks partly failed (the simulator fails
#   some calls, one attempt each) and check that its result tells the batch's story.
#
# Needs Redis on 127.0.0.1:6379 (DB $DOCQ_CHECK_REDIS_DB, default 14, flushed before and after)
# and Chromium (`apt-get install -y chromium`). Usage: .ci/browser-check.sh [output directory]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${1:-}" ]; then mkdir -p "$1"; OUT=$(cd "$1" && pwd); else OUT=$(mktemp -d); fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
DB=${DOCQ_CHECK_REDIS_DB:-14}
[ -x "$CHROMIUM" ] || { echo "no Chromium at $CHROMIUM (apt-get install -y chromium)" >&2; exit 3; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port)
FLOWER_PORT=$(free_port)
PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_hex(12))')
export DOCQ_DATABASE_URL="sqlite:///$OUT/docq.db" DOCQ_BROKER_URL="redis://127.0.0.1:6379/$DB"
export DOCQ_LLM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1" DOCQ_LLM_MODEL=docq-sim DOCQ_LLM_MODE=chat
export DOCQ_HOME="$OUT/home" DOCQ_FLOWER_USER=ops DOCQ_FLOWER_PASSWORD="$PASSWORD"
export DOCQ_BATCH_MAX_CHUNKS=4  # a few batches, so the page has several rows of the job
export DOCQ_MAX_ATTEMPTS=1  # with the simulator's faults, some chunks fail: a story to tell
docq() { "$PY" -c 'from docqueue.tasks.cli import main; main()' "$@"; }
flush() { "$PY" -c "import redis; redis.Redis.from_url('$DOCQ_BROKER_URL').flushdb()"; }

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  flush || true
}
trap cleanup EXIT
start() {  # start NAME COMMAND...: in its own process group, logging to $OUT/NAME.log
  local name=$1; shift
  setsid "$@" >"$OUT/$name.log" 2>&1 &
  PIDS+=("$!")
}
wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq 1 $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "FAIL: $what not ready after ${seconds}s" >&2; tail -n 30 "$OUT"/*.log >&2; exit 1
}
http_code() {  # http_code URL [USER:PASSWORD]
  "$PY" - "$@" <<'PY'
import base64, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    request.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
try:
    print(urllib.request.urlopen(request, timeout=5).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
PY
}

echo "== services (output in $OUT)"
flush
docq db upgrade
start simulator "$PY" -m docqueue.workers.testing.simulator --host 127.0.0.1 --port "$SIM_PORT" --seed 1 --latency-ms 50 \
  --fail-rate 0.25
start worker "$PY" -m celery -A docqueue.tasks worker --pool=prefork --concurrency=2 --loglevel=INFO \
  --without-gossip --without-mingle --events --hostname=check@%h
start flower "$PY" -c 'from docqueue.tasks.cli import main; main()' flower --port "$FLOWER_PORT"
wait_for "the simulator" 30 "$PY" -c "import urllib.request; urllib.request.urlopen('$DOCQ_LLM_BASE_URL/models', timeout=2)"
wait_for "the worker" 60 grep -q "ready\." "$OUT/worker.log"
wait_for "Flower" 30 "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$FLOWER_PORT/healthcheck', timeout=2)"
sleep 1

echo "== a small job"
JOB=$(docq submit workers/local/corpus --name browser-check --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
"$PY" -c "from docqueue.tasks.progress import watch; import sys; sys.exit(watch($JOB, interval_s=0.5)['status'] not in ('succeeded', 'partial'))"

echo "== Flower without credentials"
BASE="http://127.0.0.1:$FLOWER_PORT"
for path in /tasks /api/tasks; do
  code=$(http_code "$BASE$path")
  [ "$code" = 401 ] || { echo "FAIL: $path answered $code without credentials" >&2; exit 1; }
  echo "$path without credentials: $code"
done
[ "$(http_code "$BASE/tasks" "ops:$PASSWORD")" = 200 ] || { echo "FAIL: credentials refused" >&2; exit 1; }

echo "== the tasks page in headless Chromium"
CHROME=("$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --user-data-dir="$OUT/chromium" --window-size=1400,900 --virtual-time-budget=10000)
URL="http://ops:$PASSWORD@127.0.0.1:$FLOWER_PORT/tasks"
"${CHROME[@]}" --dump-dom "$URL" >"$OUT/tasks.html" 2>"$OUT/chromium.log"
"${CHROME[@]}" --screenshot="$OUT/flower-tasks.png" "$URL" 2>>"$OUT/chromium.log"
rows=$(grep -o "job=$JOB batch=[0-9]*/[0-9]*" "$OUT/tasks.html" | sort -u | wc -l)
batches=$(docq status "$JOB" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["batches_total"])')
echo "tasks page: $rows of $batches batches of job $JOB listed"
grep -q "job=$JOB</" "$OUT/tasks.html" || grep -q "jobs.merge" "$OUT/tasks.html" \
  || { echo "FAIL: the merge task of job $JOB is not on the page" >&2; exit 1; }
[ "$rows" -ge 1 ] && [ "$rows" -eq "$batches" ] \
  || { echo "FAIL: expected $batches batch rows of job $JOB, found $rows" >&2; exit 1; }
[ -s "$OUT/flower-tasks.png" ] || { echo "FAIL: no screenshot" >&2; exit 1; }
if grep -q "$PASSWORD" "$OUT/tasks.html"; then echo "FAIL: the password is in the page" >&2; exit 1; fi
echo "screenshot: $OUT/flower-tasks.png"

echo "== a batch's page: its result is the batch's story"
TASK=$("$PY" - "$BASE/api/tasks?taskname=batches.process" "ops:$PASSWORD" <<'PY'
import ast, base64, json, sys, urllib.request
request = urllib.request.Request(sys.argv[1])
request.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
tasks = json.load(urllib.request.urlopen(request, timeout=5))
done = [(ast.literal_eval(t["result"]), uuid) for uuid, t in tasks.items() if t.get("result")]
print(max(done, key=lambda pair: (pair[0]["errors"], pair[0]["ok"]))[1])
PY
)
TASK_URL="http://ops:$PASSWORD@127.0.0.1:$FLOWER_PORT/task/$TASK"
"${CHROME[@]}" --dump-dom "$TASK_URL" >"$OUT/task.html" 2>>"$OUT/chromium.log"
"${CHROME[@]}" --screenshot="$OUT/flower-batch.png" "$TASK_URL" 2>>"$OUT/chromium.log"
for field in "'ok': " "'errors': " "'tokens_in': " "'cost': " \
    "'failed': {'RetryableLLMError: gave up after 1 attempts; last error: HTTP 5"; do
  grep -q "$field" "$OUT/task.html" || { echo "FAIL: no $field in the result of task $TASK" >&2; exit 1; }
done
echo "batch task $TASK: its result shows counts, tokens, cost and a failed chunk's reason"
echo "screenshot: $OUT/flower-batch.png"
echo "OK"
