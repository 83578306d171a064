#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh. Data (PostgreSQL's pg/data or
# mlflow.db, artifacts, the S3 server's objects saved to s3/, the secrets) stays in the state
# folder; delete it to start from scratch.
#
# Only the processes start.sh recorded (pid, start time, command line in STATE/NAME.pid),
# with their descendants: SIGTERM first, SIGKILL only for what is left after 5 s. A recorded
# pid that now belongs to another process is left alone. Never by name pattern, never
# `ray stop` (which would stop every Ray on the machine).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="${LANE_STACK_DIR:-$ROOT/.local-stack}"
BIN="${LANE_VENV:-$ROOT/.venv}/bin"

PROC=("$BIN/python" "$ROOT/infra/local/proc.py")
status=0
for name in ray mlflow postgres; do
  [ -f "$STATE/$name.pid" ] && "${PROC[@]}" stop "$STATE" "$name"
done
# The S3 server (moto) holds its objects in memory: once nothing writes to it any more (the
# jobs and MLflow are stopped), they are saved to $STATE/s3 for the next start. Only a server
# that start.sh restored is saved (s3.endpoint); a failed save keeps the previous snapshot and
# is this script's exit status.
if [ -f "$STATE/s3.endpoint" ] && "${PROC[@]}" alive "$STATE" s3; then
  "$BIN/python" "$ROOT/infra/local/s3_state.py" save "$STATE" "$(cat "$STATE/s3.endpoint")" \
    || { echo "error: the S3 server's objects were not saved; $STATE/s3 keeps the last snapshot" >&2; status=1; }
fi
[ -f "$STATE/s3.pid" ] && "${PROC[@]}" stop "$STATE" s3
rm -f "$STATE/s3.endpoint"
exit "$status"
