#!/usr/bin/env bash
# Set up convtune on a fresh machine: a virtualenv in .venv with torch and the project.
#   bash deploy/setup.sh          # what `convtune up` needs
#   bash deploy/setup.sh --test   # plus the test extras and Debian's chromium for the MLflow UI test
# Idempotent: a second run only checks. Needs python3 (>= 3.10) with venv; Redis is started by
# `convtune up` and the tests when none answers and redis-server is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
PY=${PYTHON:-python3}
VENV=.venv

if [[ ! -x $VENV/bin/python ]]; then
    echo "==> creating $VENV"
    $PY -m venv $VENV
fi
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first and pinned: 2.13.0 is a CPU wheel on local disk on these machines; anything looser
# would pull a multi-GB CUDA build. pyproject keeps torch>=2.4 open for real GPU hosts.
if ! $VENV/bin/python -c "import torch" 2>/dev/null; then
    echo "==> installing torch==${TORCH_VERSION:-2.13.0}"
    pip install "torch==${TORCH_VERSION:-2.13.0}"
fi
extras="[worker]"
[[ $want_test == 1 ]] && extras="[worker,test]"
echo "==> installing convtune$extras"
pip install -e ".$extras"
$VENV/bin/python -c "import torch, service, workers, models" || { echo "installation is broken" >&2; exit 1; }

if ! command -v redis-server >/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    echo "==> no Redis: installing redis-server"
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else
        echo "warning: install Redis (apt-get install redis-server) or set CONVTUNE_REDIS_URL" >&2
    fi
fi

if [[ $want_test == 1 && ! -x /usr/bin/chromium ]]; then
    # The MLflow UI test drives Debian's chromium; no browser is ever downloaded by a test tool.
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        echo "==> installing Debian's chromium for the MLflow UI test"
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: /usr/bin/chromium missing (apt-get install chromium): the MLflow UI test will be skipped" >&2
    fi
fi
echo "==> ready: . $VENV/bin/activate"
