#!/usr/bin/env bash
# The one entry point of jaxformer.
#
#   ./launch.sh                         train the default experiment into runs/default, evaluate
#                                       its test split and print sample translations
#   ./launch.sh EXPERIMENT [--workdir DIR] [--config.KEY=VALUE ...]
#                                       train any experiment (experiments/EXPERIMENT.py)
#   ./launch.sh test [PYTEST ARGS]      run the test suite
#   ./launch.sh --help                  this text
#
# Every mode first makes sure a Python environment with jaxformer exists: an active virtualenv
# is used as it is (jaxformer is installed into it if missing); otherwise ./.venv is created
# with `python3 -m venv` and `pip install -e '.[test]'`, and reinstalled when pyproject.toml
# changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

setup_env() {
  local stamp want
  want="$(cksum < pyproject.toml)"
  if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
    PY="${VIRTUAL_ENV}/bin/python"
  else
    PY="$ROOT/.venv/bin/python"
    if [[ ! -x "$PY" ]]; then
      echo "launch.sh: creating .venv (first run only)" >&2
      python3 -m venv "$ROOT/.venv"
    fi
  fi
  stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.jaxformer-installed"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] || ! "$PY" -c 'import jaxformer, pytest' 2>/dev/null; then
    echo "launch.sh: installing jaxformer and its dependencies into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e "$ROOT[test]"
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  -h|--help|help)
    usage
    exit 0
    ;;
  test)
    shift
    setup_env
    exec "$PY" -m pytest "$@"
    ;;
esac

EXPERIMENT=default
if [[ $# -gt 0 && "$1" != -* ]]; then
  EXPERIMENT="$1"
  shift
fi
WORKDIR="runs/$(basename "${EXPERIMENT%.py}")"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

setup_env
"$PY" -m jaxformer train --config "$EXPERIMENT" --workdir "$WORKDIR" ${ARGS[@]+"${ARGS[@]}"}
exec "$PY" -m jaxformer evaluate --workdir "$WORKDIR" --split test --samples 5
