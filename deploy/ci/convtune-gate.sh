#!/usr/bin/env bash
# Bring up the convtune stack on this CI runner, run a study, and fail the job when it misses its bar.
#
#   deploy/ci/convtune-gate.sh deploy/ci/study.yaml --require 'val_accuracy>=0.95'
#
# Extra arguments go to `convtune study create` (--require, --timeout, ...). The job's exit code is
# convtune's: 0 passed, 1 the study failed, 2 invalid spec, 3 service unavailable, 4 a requirement
# was not met, 5 auth failure, 6 timeout (docs/cli.md). Reports land in $CONVTUNE_REPORTS:
# convtune-junit.xml (one test case per trial), convtune-summary.md and convtune-result.json.
# To gate against a shared convtune service instead, skip the stack: set CONVTUNE_API and
# CONVTUNE_TOKEN and run `convtune study create` directly.
set -euo pipefail

spec=${1:?usage: convtune-gate.sh STUDY_SPEC [convtune study create options...]}
shift
home=${CONVTUNE_HOME:-.convtune}
api_port=${CONVTUNE_API_PORT:-8000}
mlflow_port=${CONVTUNE_MLFLOW_PORT:-5000}
reports=${CONVTUNE_REPORTS:-reports}
summary=${CONVTUNE_SUMMARY:-$reports/convtune-summary.md}
mkdir -p "$home" "$reports"

convtune up --home "$home" --api-port "$api_port" --mlflow-port "$mlflow_port" --cpu-workers "${CONVTUNE_CPU_WORKERS:-2}" >"$home/up.log" 2>&1 &
stack=$!
stop_stack() {
    kill -TERM "$stack" 2>/dev/null || true
    wait "$stack" 2>/dev/null || true
}
trap stop_stack EXIT

export CONVTUNE_API="http://127.0.0.1:$api_port"
echo "waiting for the convtune stack at $CONVTUNE_API ..."
for _ in $(seq 1 150); do
    if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/readyz', timeout=2)" "$CONVTUNE_API" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$stack" 2>/dev/null; then
        echo "the stack did not start:" >&2
        tail -n 50 "$home/up.log" >&2
        exit 3
    fi
    sleep 2
done

set +e
convtune study create "$spec" --wait --json --junit "$reports/convtune-junit.xml" --summary "$summary" "$@" >"$reports/convtune-result.json"
code=$?
set -e
python -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['verdict'])" "$reports/convtune-result.json" 2>/dev/null || true
echo "convtune exited $code"
exit "$code"
