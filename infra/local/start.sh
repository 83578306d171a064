#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: a Ray head (dashboard + job server, token
# authentication on), an MLflow tracking server on a PostgreSQL backend store (an instance
# initialised under the state folder; sqlite where the PostgreSQL server binaries are missing,
# or with --sqlite), and with --s3 a local S3-protocol server (moto) to try the s3:// paths
# (its objects saved to the state folder by stop.sh and restored here).
# Then:
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
PG_PORT="${PG_PORT:-5433}"
WITH_S3=0
BACKEND=postgres
ARTIFACTS=""
RAY_CPUS=""
RESTART_MLFLOW=0

usage() {
  cat <<USAGE
usage: infra/local/start.sh [--s3] [--artifacts URI] [--num-cpus N]
       infra/local/start.sh --restart-mlflow
  --s3             also start a local S3 server (moto) on 127.0.0.1:$S3_PORT with bucket 'lanes'
                   (stop.sh saves its objects to $STATE/s3, the next start restores them)
  --artifacts URI  where the MLflow server stores artifacts (default: $STATE/mlartifacts;
                   s3://lanes/mlartifacts with --s3)
  --num-cpus N     logical CPUs of the Ray head (default: all cores, at least 4)
  --sqlite         MLflow's backend store in sqlite instead of PostgreSQL (127.0.0.1:$PG_PORT)
  --restart-mlflow restart only the MLflow server of the running stack (same store, port and
                   artifacts; running jobs buffer their records meanwhile)
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --s3) WITH_S3=1 ;;
    --artifacts) ARTIFACTS="$2"; shift ;;
    --num-cpus) RAY_CPUS="$2"; shift ;;
    --sqlite) BACKEND=sqlite ;;
    --restart-mlflow) RESTART_MLFLOW=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ -x "$BIN/ray" ] || { echo "error: $BIN/ray not found; run 'make venv' first" >&2; exit 2; }
# The servers' own packages are the `stack` extra (the jobs and the Ray image never need them).
"$BIN/python" -c "import psycopg2, mlflow.server.auth, moto.server" 2>/dev/null || {
  echo "error: the local stack's servers are not installed in ${BIN%/bin}; run:" \
    "$BIN/pip install -c constraints.txt -e '.[stack]'" >&2; exit 2; }
if [ "$RESTART_MLFLOW" = 1 ] && [ ! -f "$STATE/mlflow.pid" ]; then
  echo "error: no MLflow server of a local stack in $STATE (start the stack first)" >&2
  exit 2
fi
if [ "$RESTART_MLFLOW" = 0 ] && [ -f "$STATE/ray.pid" ]; then
  echo "error: a local stack is already running from $STATE (infra/local/stop.sh stops it)" >&2
  exit 2
fi
mkdir -p "$STATE"

# Secrets, generated once, readable by this user only, never on a command line: the Ray
# token (clients read it through RAY_AUTH_TOKEN_PATH), the MLflow admin password (clients
# read it through MLFLOW_TRACKING_PASSWORD, set by env.sh from the file) and the key MLflow
# signs its CSRF tokens with.
secret() {
  [ -s "$1" ] || (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$1")
}
secret "$STATE/ray_auth_token"
secret "$STATE/mlflow_password"
secret "$STATE/mlflow_flask_secret"
# MLflow's basic-auth app: nobody gets in without credentials; its user store lives beside
# the tracking store. The admin is created at the first start with the generated password.
(umask 077 && cat > "$STATE/mlflow_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$STATE/mlflow_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A checked password is trusted for 60 s: without this every request pays a PBKDF2 hash (a
# training run's artifact uploads are hundreds of requests); a changed password takes effect
# within 60 s.
auth_cache_ttl_seconds = 60
INI
)

[ "$RESTART_MLFLOW" = 1 ] || {
  echo "# source this file: settings for clients of the local stack in $STATE"
  # The venv first on PATH: "ray" for clients, and "python" for job entrypoints (the Ray
  # head, started with this environment, runs them with its PATH).
  echo "export PATH='$BIN':\"\$PATH\""
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH='$STATE/ray_auth_token'"
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT  # ray job submit/status/logs"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  echo "export MLFLOW_TRACKING_USERNAME=admin"
  echo "export MLFLOW_TRACKING_PASSWORD=\"\$(cat '$STATE/mlflow_password')\""
  if [ "$WITH_S3" = 1 ]; then
    # moto accepts any key; these are not secrets.
    echo "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT"
    echo "export AWS_ACCESS_KEY_ID=local-stack AWS_SECRET_ACCESS_KEY=local-stack AWS_REGION=us-east-1"
  fi
} > "$STATE/env.sh"
# shellcheck disable=SC1091
. "$STATE/env.sh"

PROC=("$BIN/python" "$ROOT/infra/local/proc.py")

fail() {
  echo "error: $*" >&2
  exit 1
}

# Whatever goes wrong from here on (a failed step, Ctrl-C, a kill), what this script started
# is stopped again: a failed start leaves nothing running. A --restart-mlflow that fails
# leaves the rest of the stack alone.
if [ "$RESTART_MLFLOW" = 0 ]; then
  STARTED=0
  cleanup() {
    local status=$?
    if [ "$STARTED" != 1 ]; then
      LANE_STACK_DIR="$STATE" "$ROOT/infra/local/stop.sh" > /dev/null 2>&1
    fi
    exit "$status"
  }
  trap cleanup EXIT
  trap 'echo "interrupted: stopping what was started" >&2; exit 130' INT
  trap 'exit 143' TERM
fi

wait_http() {  # wait_http URL NAME PORT [AUTH]: AUTH is "bearer FILE" or "basic USER FILE"
  # Ready means: the answer comes from the process this script started (a stale server on
  # the port would answer too), and an authenticated request succeeds.
  for _ in $(seq 1 120); do
    if "$BIN/python" - "$1" ${4:-} <<'PY' 2>/dev/null; then
import base64, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    secret = open(sys.argv[-1]).read().strip()
    if sys.argv[2] == "bearer":
        req.add_header("Authorization", "Bearer " + secret)
    else:
        basic = base64.b64encode(f"{sys.argv[3]}:{secret}".encode()).decode()
        req.add_header("Authorization", "Basic " + basic)
urllib.request.urlopen(req, timeout=2)
PY
      "${PROC[@]}" owns "$STATE" "$2" "$3" >&2 || fail "$2: port $3 is taken by another server; stop it or choose another port"
      return 0
    fi
    "${PROC[@]}" alive "$STATE" "$2" || fail "$2 exited; see $STATE/$2.log"
    sleep 0.5
  done
  fail "$2 did not answer on $1 in 60s; see $STATE/$2.log"
}

if [ "$WITH_S3" = 1 ]; then
  "$BIN/python" -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$STATE/s3.log" 2>&1 &
  "${PROC[@]}" record "$STATE" s3 $!
  wait_http "http://127.0.0.1:$S3_PORT/moto-api/" s3 "$S3_PORT"
  # moto keeps objects in memory: what the last stop saved to $STATE/s3 goes back in first.
  # Only a server whose restore succeeded is saved again by stop.sh ($STATE/s3.endpoint says
  # so), so a failed start never overwrites the snapshot with an empty server.
  "$BIN/python" "$ROOT/infra/local/s3_state.py" restore "$STATE" "$AWS_ENDPOINT_URL_S3" \
    || fail "the S3 snapshot in $STATE/s3 was not restored (above)"
  echo "$AWS_ENDPOINT_URL_S3" > "$STATE/s3.endpoint"
  # (In us-east-1, creating a bucket its owner already has succeeds and keeps its objects.)
  "$BIN/python" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL_S3').create_bucket(Bucket='lanes')"
  ARTIFACTS="${ARTIFACTS:-s3://lanes/mlartifacts}"
  echo "S3 server      http://127.0.0.1:$S3_PORT  (bucket: lanes; saved to $STATE/s3 at each stop)"
fi

# PostgreSQL, the backend store real deployments use: an instance initialised once under
# $STATE/pg, listening on 127.0.0.1:$PG_PORT only (and a Unix socket in $STATE/pg/run), a
# role "mlflow" whose generated password reaches the MLflow server through PGPASSWORD. The
# server binaries come from Debian's postgresql package; without them the stack says so and
# uses sqlite. Run as root, PostgreSQL (which refuses root) runs as the "postgres" user.
pg_bin() {
  local dir
  dir="$(pg_config --bindir 2>/dev/null || true)"
  [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return; }
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return; }
  done
}
start_postgres() {
  local as=() data="$STATE/pg/data" run="$STATE/pg/run"
  if [ "$(id -u)" = 0 ]; then
    as=(runuser -u postgres --)
    chmod o+x "$STATE"  # traverse only: the postgres user reaches $STATE/pg, lists nothing
  fi
  mkdir -p "$STATE/pg/run"
  chmod 700 "$STATE/pg" "$run"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$STATE/pg"
  if [ ! -f "$data/PG_VERSION" ]; then
    "${as[@]}" "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 > "$STATE/postgres.log" 2>&1 || fail "initdb failed; see $STATE/postgres.log"
  fi
  "${as[@]}" "$PG_BIN/postgres" -D "$data" -h 127.0.0.1 -p "$PG_PORT" -k "$run" \
    >> "$STATE/postgres.log" 2>&1 &
  "${PROC[@]}" record "$STATE" postgres $!
  for _ in $(seq 1 120); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    "${PROC[@]}" alive "$STATE" postgres || fail "postgres exited; see $STATE/postgres.log"
    sleep 0.5
  done
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || fail "postgres did not start in 60s; see $STATE/postgres.log"
  "${PROC[@]}" owns "$STATE" postgres "$PG_PORT" >&2 || fail "postgres: port $PG_PORT is taken by another server; set PG_PORT"
  # The role and database, once; the password goes in on stdin, not the command line.
  "${as[@]}" psql -X -q -h "$run" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    >> "$STATE/postgres.log" 2>&1 <<SQL || fail "could not create the mlflow role; see $STATE/postgres.log"
SELECT 'CREATE ROLE mlflow LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow')\\gexec
ALTER ROLE mlflow PASSWORD '$(cat "$STATE/pg_password")';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\\gexec
SQL
  echo "PostgreSQL     127.0.0.1:$PG_PORT  (data: $STATE/pg/data; role mlflow, password in $STATE/pg_password)"
}

# MLflow: runs and the registry in PostgreSQL (or sqlite), artifacts served (proxied) by the
# server itself, so clients need no access to the artifact store. Its port, store and
# artifacts are remembered for --restart-mlflow.
start_mlflow() {
  local store
  if [ "$BACKEND" = postgres ]; then
    store="postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow"
  else
    store="sqlite:///$STATE/mlflow.db"
  fi
  # The secrets (and the store's URI) reach the server through its environment, not its
  # command line.
  MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow_auth.ini" \
  MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$STATE/mlflow_password")" \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/mlflow_flask_secret")" \
  MLFLOW_BACKEND_STORE_URI="$store" PGPASSWORD="$(cat "$STATE/pg_password" 2>/dev/null)" \
  "$BIN/mlflow" server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 --artifacts-destination "$ARTIFACTS" >> "$STATE/mlflow.log" 2>&1 &
  "${PROC[@]}" record "$STATE" mlflow $!
  wait_http "http://127.0.0.1:$MLFLOW_PORT/api/2.0/mlflow/experiments/search?max_results=1" \
    mlflow "$MLFLOW_PORT" "basic admin $STATE/mlflow_password"
  echo "MLflow server  http://127.0.0.1:$MLFLOW_PORT  (store: $store; user admin, password in $STATE/mlflow_password)"
}
if [ "$RESTART_MLFLOW" = 1 ]; then
  # shellcheck disable=SC1091
  . "$STATE/mlflow.conf"
  # (it may be gone already: a crash, or a test that stopped it)
  "${PROC[@]}" stop "$STATE" mlflow
  start_mlflow
  exit 0
fi
if [ "$BACKEND" = postgres ]; then
  PG_BIN="$(pg_bin)"
  if [ -z "$PG_BIN" ]; then
    echo "note: no PostgreSQL server binaries (install them: apt-get install postgresql); MLflow's store is sqlite"
    BACKEND=sqlite
  elif [ "$(id -u)" = 0 ] && ! id postgres > /dev/null 2>&1; then
    echo "note: running as root without a 'postgres' user to run PostgreSQL as; MLflow's store is sqlite"
    BACKEND=sqlite
  fi
fi
if [ "$BACKEND" = postgres ]; then
  secret "$STATE/pg_password"
  start_postgres
fi
ARTIFACTS="${ARTIFACTS:-$STATE/mlartifacts}"
printf 'MLFLOW_PORT=%q\nARTIFACTS=%q\nBACKEND=%q\nPG_PORT=%q\n' "$MLFLOW_PORT" "$ARTIFACTS" \
  "$BACKEND" "$PG_PORT" > "$STATE/mlflow.conf"
start_mlflow

# Ray head. The environment exported above (token, MLflow URI, S3 endpoint) is inherited
# by every Ray worker and job driver it starts. --temp-dir keeps its session files (and its
# address) apart from any other local Ray.
cpus="${RAY_CPUS:-$("$BIN/python" -c 'import os; print(max(os.cpu_count() or 1, 4))')}"
# The dashboard agent (52365) and the Ray client server (10001) have fixed default ports: a
# second Ray on this machine (a job run directly, a test session) would take them, and a head
# without its agent cannot run jobs. Free ports are picked instead.
free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# --block: `ray start` stays in the foreground as the parent of the head's processes, so
# stop.sh stops the head by its recorded pid (and that pid's descendants).
"$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$RAY_GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
  --dashboard-agent-listen-port "${RAY_AGENT_PORT:-$(free_port)}" \
  --ray-client-server-port "${RAY_CLIENT_PORT:-$(free_port)}" \
  --num-cpus "$cpus" --temp-dir "$STATE/ray" --disable-usage-stats > "$STATE/ray.log" 2>&1 &
"${PROC[@]}" record "$STATE" ray $!
wait_http "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" ray "$RAY_DASHBOARD_PORT" \
  "bearer $STATE/ray_auth_token"
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
STARTED=1
echo "Ray dashboard  http://127.0.0.1:$RAY_DASHBOARD_PORT  (token: $STATE/ray_auth_token)"
echo
echo "Next:  source $STATE/env.sh"
echo "       ray job submit --working-dir . -- python -m jobs.train --help"
