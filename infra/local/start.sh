#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: a Ray head (dashboard + job server, token
# authentication on), an MLflow tracking server (sqlite backend store), and with --s3 a local
# S3-protocol server (moto) to try the s3:// paths. Then:
#
#   source .local-stack/env.sh
#   ray job submit --working-dir . -- python -m jobs.train ...
#
# Stop everything with infra/local/stop.sh. Ports and the state folder can be changed with
# the variables below; nothing listens on anything but 127.0.0.1.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="${LANE_STACK_DIR:-$ROOT/.local-stack}"
BIN="${LANE_VENV:-$ROOT/.venv}/bin"
RAY_GCS_PORT="${RAY_GCS_PORT:-6390}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
S3_PORT="${S3_PORT:-9000}"
WITH_S3=0
ARTIFACTS=""
RAY_CPUS=""
RESTART_MLFLOW=0

usage() {
  cat <<USAGE
usage: infra/local/start.sh [--s3] [--artifacts URI] [--num-cpus N]
       infra/local/start.sh --restart-mlflow
  --s3             also start a local S3 server (moto) on 127.0.0.1:$S3_PORT with bucket 'lanes'
  --artifacts URI  where the MLflow server stores artifacts (default: $STATE/mlartifacts;
                   s3://lanes/mlartifacts with --s3)
  --num-cpus N     logical CPUs of the Ray head (default: all cores, at least 4)
  --restart-mlflow restart only the MLflow server of the running stack (same store, port and
                   artifacts; running jobs buffer their records meanwhile)
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --s3) WITH_S3=1 ;;
    --artifacts) ARTIFACTS="$2"; shift ;;
    --num-cpus) RAY_CPUS="$2"; shift ;;
    --restart-mlflow) RESTART_MLFLOW=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ -x "$BIN/ray" ] || { echo "error: $BIN/ray not found; run 'make venv' first" >&2; exit 2; }
if [ "$RESTART_MLFLOW" = 1 ] && [ ! -f "$STATE/mlflow.pid" ]; then
  echo "error: no MLflow server of a local stack in $STATE (start the stack first)" >&2
  exit 2
fi
if [ "$RESTART_MLFLOW" = 0 ] && [ -f "$STATE/ray.started" ]; then
  echo "error: a local stack is already running from $STATE (infra/local/stop.sh stops it)" >&2
  exit 2
fi
mkdir -p "$STATE"

# The Ray token: generated once, readable by this user only. Clients (ray job submit, the
# dashboard in a browser, python) read it through RAY_AUTH_TOKEN_PATH.
if [ ! -s "$STATE/ray_auth_token" ]; then
  (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/ray_auth_token")
fi

[ "$RESTART_MLFLOW" = 1 ] || {
  echo "# source this file: settings for clients of the local stack in $STATE"
  # The venv first on PATH: "ray" for clients, and "python" for job entrypoints (the Ray
  # head, started with this environment, runs them with its PATH).
  echo "export PATH='$BIN':\"\$PATH\""
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH='$STATE/ray_auth_token'"
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT  # ray job submit/status/logs"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  if [ "$WITH_S3" = 1 ]; then
    # moto accepts any key; these are not secrets.
    echo "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT"
    echo "export AWS_ACCESS_KEY_ID=local-stack AWS_SECRET_ACCESS_KEY=local-stack AWS_REGION=us-east-1"
  fi
} > "$STATE/env.sh"
# shellcheck disable=SC1091
. "$STATE/env.sh"

fail() {  # stop what was started, so a failed start leaves nothing running
  echo "error: $*" >&2
  LANE_STACK_DIR="$STATE" "$(dirname "$0")/stop.sh" > /dev/null 2>&1
  exit 1
}

wait_http() {  # wait_http URL NAME PIDFILE [TOKEN_FILE]
  for _ in $(seq 1 120); do
    if "$BIN/python" - "$1" "${4:-}" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:  # the Ray dashboard answers 401 without the token
    req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
urllib.request.urlopen(req, timeout=2)
PY
    if [ -n "${3:-}" ] && ! kill -0 "$(cat "$3")" 2>/dev/null; then
      fail "$2 exited; see $STATE/$2.log"
    fi
    sleep 0.5
  done
  fail "$2 did not answer on $1 in 60s; see $STATE/$2.log"
}

if [ "$WITH_S3" = 1 ]; then
  "$BIN/python" -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$STATE/s3.log" 2>&1 &
  echo $! > "$STATE/s3.pid"
  wait_http "http://127.0.0.1:$S3_PORT/moto-api/" s3 "$STATE/s3.pid"
  "$BIN/python" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL_S3').create_bucket(Bucket='lanes')"
  ARTIFACTS="${ARTIFACTS:-s3://lanes/mlartifacts}"
  echo "S3 server      http://127.0.0.1:$S3_PORT  (bucket: lanes)"
fi

# MLflow: runs and the registry in sqlite, artifacts served (proxied) by the server itself,
# so clients need no access to the artifact store. Its port and artifacts are remembered for
# --restart-mlflow.
start_mlflow() {
  "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "$ARTIFACTS" >> "$STATE/mlflow.log" 2>&1 &
  echo $! > "$STATE/mlflow.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow "$STATE/mlflow.pid"
  echo "MLflow server  http://127.0.0.1:$MLFLOW_PORT  (store: $STATE/mlflow.db)"
}
if [ "$RESTART_MLFLOW" = 1 ]; then
  # shellcheck disable=SC1091
  . "$STATE/mlflow.conf"
  pid="$(cat "$STATE/mlflow.pid")"
  # (it may be gone already: a crash, or a test that stopped it)
  pkill -TERM -P "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  echo "stopped MLflow server (pid $pid)"
  start_mlflow
  exit 0
fi
ARTIFACTS="${ARTIFACTS:-$STATE/mlartifacts}"
printf 'MLFLOW_PORT=%q\nARTIFACTS=%q\n' "$MLFLOW_PORT" "$ARTIFACTS" > "$STATE/mlflow.conf"
start_mlflow

# Ray head. The environment exported above (token, MLflow URI, S3 endpoint) is inherited
# by every Ray worker and job driver it starts. --temp-dir keeps its session files (and its
# address) apart from any other local Ray.
cpus="${RAY_CPUS:-$("$BIN/python" -c 'import os; print(max(os.cpu_count() or 1, 4))')}"
# The dashboard agent (52365) and the Ray client server (10001) have fixed default ports: a
# second Ray on this machine (a job run directly, a test session) would take them, and a head
# without its agent cannot run jobs. Free ports are picked instead.
free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
  --dashboard-agent-listen-port "${RAY_AGENT_PORT:-$(free_port)}" \
  --ray-client-server-port "${RAY_CLIENT_PORT:-$(free_port)}" \
  --num-cpus "$cpus" --temp-dir "$STATE/ray" --disable-usage-stats > "$STATE/ray.log" 2>&1 \
  || { touch "$STATE/ray.started"; fail "ray start failed; see $STATE/ray.log"; }
touch "$STATE/ray.started"
wait_http "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" ray "" "$STATE/ray_auth_token"
# Ready means a job runs: the job server hands jobs to the head's dashboard agent, which
# registers some seconds after the dashboard answers (a submission before that fails with
# "No available agent"). A first job that imports the project also proves that job
# entrypoints get this venv's python.
"$BIN/python" - "$RAY_API_SERVER_ADDRESS" <<'PY' || fail "the Ray job server is not ready; see $STATE/ray.log"
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
deadline = time.time() + 180
while True:
    try:
        job = client.submit_job(
            entrypoint="python -c 'import fcn_models, pipelines, jobs'",
            metadata={"purpose": "infra/local/start.sh readiness check"},
        )
        break
    except RuntimeError as e:
        if "No available agent" not in str(e) or time.time() > deadline:
            raise
        time.sleep(2)
while not (status := client.get_job_status(job)).is_terminal():
    if time.time() > deadline:
        sys.exit(f"readiness job {job} still {status}")
    time.sleep(1)
if status != JobStatus.SUCCEEDED:
    sys.exit(f"readiness job {job} {status}:\n{client.get_job_logs(job)}")
PY
echo "Ray dashboard  http://127.0.0.1:$RAY_DASHBOARD_PORT  (token: $STATE/ray_auth_token)"
echo
echo "Next:  source $STATE/env.sh"
echo "       ray job submit --working-dir . -- python -m jobs.train --help"
