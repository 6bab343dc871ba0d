#!/usr/bin/env bash
# The weekly dependency check: the contract tests of models/compat (tests/compat) against the newest
# releases of the libraries whose internals convtune uses, in a throwaway virtualenv.
#
#   deploy/newest-deps.sh [--dry-run] [--keep]
#
# pyproject.toml caps optuna, mlflow, kombu, httpx, httpcore and torch to the versions the contract
# tests passed on. This installs the newest of each (ignoring the caps) and runs tests/compat; a
# failure names the library, its version and the assumption that broke (models/compat/<module>.py).
# Passing: raise that library's cap in pyproject.toml. Docs: docs/operations.md, "Upgrading a dependency".
#
# torch is never downloaded (a download would be a CUDA build): the newest CPU wheel on disk
# (torch-*+cpu-*.whl in $TORCH_WHEELS, default $PIP_FIND_LINKS or /opt/wheels) if it is newer than
# the one installed for $PYTHON (default .venv/bin/python), else that installed build, linked in.
# The integration test of the artifact layout starts an `mlflow server`; Redis is the machine's
# (127.0.0.1:6379, database $CONVTUNE_TEST_REDIS_DB, default 11) or one the tests start.
# --dry-run prints what it would do and the newest version of each library; --keep keeps the virtualenv.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH_WHEELS="${TORCH_WHEELS:-${PIP_FIND_LINKS:-/opt/wheels}}"
LIBRARIES=(optuna mlflow kombu celery httpx httpcore)
# What tests/compat and tests/conftest.py import besides them.
HARNESS=(pytest pytest-timeout redis pydantic packaging)
DRY_RUN=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

installed_torch="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))')"
newest_wheel="$(ls -1 "$TORCH_WHEELS"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
wheel_version="$(basename "${newest_wheel:-torch-0-}" | cut -d- -f2)"
if [ -n "$newest_wheel" ] && [ "$(printf '%s\n%s\n' "$installed_torch" "$wheel_version" | sort -V | tail -n 1)" != "$installed_torch" ]; then
  torch_from="wheel"
  echo "torch: $wheel_version from $newest_wheel (installed: $installed_torch)"
else
  torch_from="installed"
  echo "torch: $installed_torch, the build installed for $PYTHON (no newer CPU wheel in $TORCH_WHEELS)"
fi

if [ "$DRY_RUN" = 1 ]; then
  for library in "${LIBRARIES[@]}"; do
    newest="$("$PYTHON" -m pip index versions "$library" 2>/dev/null | head -n 1 || true)"
    echo "$library: installed $("$PYTHON" -c "import importlib.metadata as m; print(m.version('$library'))"), newest ${newest:-unknown (no registry answer)}"
  done
fi

HOME_DIR="$(mktemp -d -t convtune-newest-deps.XXXXXX)"
VENV="$HOME_DIR/venv"
if [ "$KEEP" = 0 ] && [ "$DRY_RUN" = 0 ]; then trap 'rm -rf "$HOME_DIR"' EXIT; fi
[ "$DRY_RUN" = 1 ] && rmdir "$HOME_DIR"

run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/python" -m pip install --quiet --upgrade pip "${HARNESS[@]}"
if [ "$torch_from" = wheel ]; then
  run "$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$newest_wheel"
else
  # Link the installed build's own files (torch, torchgen, functorch, its dist-info): nothing is downloaded.
  echo "+ link torch $installed_torch into $VENV"
  if [ "$DRY_RUN" = 0 ]; then
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" - "$site" <<'PY'
import importlib.metadata as m, os, sys
dist = m.distribution("torch")
tops = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}
for top in sorted(tops):
    source = dist.locate_file(top)
    if source.exists():
        os.symlink(source, os.path.join(sys.argv[1], top))
PY
  fi
fi
# torch's own requirements (pure Python: sympy, networkx, filelock...), read from its metadata.
echo "+ install torch's requirements"
if [ "$DRY_RUN" = 0 ]; then
  mapfile -t torch_requires < <("$VENV/bin/python" - <<'PY'
import importlib.metadata as m
from packaging.requirements import Requirement
for text in m.requires("torch") or ():
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        print(str(requirement).split(";")[0].strip())
PY
)
  [ "${#torch_requires[@]}" = 0 ] || "$VENV/bin/python" -m pip install --quiet "${torch_requires[@]}"
fi
# The newest of each library, caps ignored; torch is held where it is (a constraint on its installed version).
echo "+ constrain torch to the one linked or installed"
if [ "$DRY_RUN" = 0 ]; then
  "$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$HOME_DIR/torch.txt"
fi
run "$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager --constraint "$HOME_DIR/torch.txt" "celery[redis]" "${LIBRARIES[@]}"
if [ "$DRY_RUN" = 0 ]; then
  "$VENV/bin/python" -c 'import importlib.metadata as m, sys; print("testing with", ", ".join(f"{n} {m.version(n)}" for n in sys.argv[1:]))' torch "${LIBRARIES[@]}"
fi

cd "$ROOT"
run env PYTHONPATH="$ROOT" CONVTUNE_TEST_REDIS_DB="${CONVTUNE_TEST_REDIS_DB:-11}" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/compat
