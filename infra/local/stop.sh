#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh. Data (mlflow.db, artifacts, the
# token) stays in the state folder; delete it to start from scratch.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="${LANE_STACK_DIR:-$ROOT/.local-stack}"
BIN="${LANE_VENV:-$ROOT/.venv}/bin"

if [ -f "$STATE/ray.started" ]; then
  # Only this stack's Ray: `ray stop` would stop every Ray on the machine.
  for pid in $(pgrep -f -- "--temp-dir=$STATE/ray|--temp-dir $STATE/ray|$STATE/ray/session_" 2>/dev/null); do
    kill "$pid" 2>/dev/null
  done
  sleep 2
  for pid in $(pgrep -f -- "$STATE/ray/session_" 2>/dev/null); do
    kill -9 "$pid" 2>/dev/null
  done
  rm -f "$STATE/ray.started"
  echo "stopped Ray head"
fi
for name in mlflow s3; do
  pidfile="$STATE/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  # mlflow server runs its workers in child processes: stop the whole group.
  pkill -TERM -P "$pid" 2>/dev/null
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
  echo "stopped $name"
done
exit 0
