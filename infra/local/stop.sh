#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh. Data (PostgreSQL's pg/data or
# mlflow.db, artifacts, the secrets) stays in the state folder; delete it to start from scratch.
#
# Only the processes start.sh recorded (pid, start time, command line in STATE/NAME.pid),
# with their descendants: SIGTERM first, SIGKILL only for what is left after 5 s. A recorded
# pid that now belongs to another process is left alone. Never by name pattern, never
# `ray stop` (which would stop every Ray on the machine).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="${LANE_STACK_DIR:-$ROOT/.local-stack}"
BIN="${LANE_VENV:-$ROOT/.venv}/bin"

for name in ray mlflow postgres s3; do
  [ -f "$STATE/$name.pid" ] && "$BIN/python" "$ROOT/infra/local/proc.py" stop "$STATE" "$name"
done
exit 0
