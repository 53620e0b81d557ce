#!/usr/bin/env bash
# The one entry point of jaxformer.
#
#   ./launch.sh                         train the default experiment into runs/default, evaluate
#                                       its test split and print sample translations
#   ./launch.sh EXPERIMENT [--workdir DIR] [--config.KEY=VALUE ...]
#                                       train any experiment (experiments/EXPERIMENT.py)
#   ./launch.sh EXPERIMENT --processes N [--devices-per-process M] [--stop-grace S] [...]
#                                       a simulated pod: N local processes of M CPU devices
#                                       each, joined by jax.distributed on 127.0.0.1; output
#                                       prefixed [i]; one fails -> all stop, exit non-zero
#   ./launch.sh EXPERIMENT --processes N --detach [...]
#                                       the same pod detached from this terminal: returns at
#                                       once; worker i logs to WORKDIR/logs/worker_<i>.log
#   ./launch.sh EXPERIMENT --tpu NAME --zone ZONE [--project P] [--revision REV] [--dry-run]
#                                       run on every worker of an existing TPU VM (gcloud):
#                                       copy HEAD (or check out REV), set up .venv with the
#                                       tpu extra, start the trainer detached on every worker
#                                       (a dropped connection does not end it) and return; use
#                                       --workdir gs://BUCKET/RUN; --dry-run prints the commands
#   The same command (TPU or detached pod) plus one of:
#     --status                          each worker: running / finished / stopped / error /
#                                       failed, its exit status and last logged step
#     --logs [--worker I] [--follow]    print (or follow) worker I's log (default 0)
#     --stop                            SIGTERM to every trainer: they save at one step and exit
#                                       as stopped; the same command without it resumes
#   GPU cluster, one process per host:  on host i set JAXFORMER_COORDINATOR_ADDRESS=HOST0:PORT
#                                       JAXFORMER_NUM_PROCESSES=N JAXFORMER_PROCESS_ID=i (or
#                                       only JAXFORMER_DISTRIBUTED=auto under SLURM) and run
#                                       .venv/bin/python -m jaxformer train --config EXPERIMENT
#                                       --workdir SHARED_DIR (see README, "Several hosts")
#   ./launch.sh test [PYTEST ARGS]      run the test suite
#   ./launch.sh --help                  this text
#
# Every mode first makes sure a Python environment with jaxformer exists: an active virtualenv
# is used as it is (jaxformer is installed into it if missing); otherwise ./.venv is created
# with `python3 -m venv` and `pip install -c constraints.txt -e '.[test]'` (the tested version
# of every dependency), and reinstalled when pyproject.toml or constraints.txt changes.
# JAXFORMER_UNPINNED=1 installs without the constraints (pyproject's floors only: the newest
# versions in a new environment). JAXFORMER_EXTRAS=interop (comma-separated extras) adds those
# extras to the install: CI runs `JAXFORMER_EXTRAS=interop ./launch.sh test`, so the
# Hugging Face, CTranslate2 and torch tests run there (they skip, saying so, without it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

setup_env() {
  local stamp want pins=(-c "$ROOT/constraints.txt") extras="test${JAXFORMER_EXTRAS:+,$JAXFORMER_EXTRAS}"
  if [[ "${JAXFORMER_UNPINNED:-0}" != 0 ]]; then
    pins=()
    want="$(cksum < pyproject.toml) unpinned [$extras]"
  else
    want="$(cksum < pyproject.toml) $(cksum < constraints.txt) [$extras]"
  fi
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
    "$PY" -m pip install -q ${pins[@]+"${pins[@]}"} -e "$ROOT[$extras]"
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
    # Two workers (the CI machine has two cores), each test file kept on one worker so that
    # its module fixtures (data, vocabularies, reference runs) are built once; files handed
    # out in collection order (tests/conftest.py puts the longest first), not by test count.
    exec "$PY" -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
    ;;
esac

EXPERIMENT=default
if [[ $# -gt 0 && "$1" != -* ]]; then
  EXPERIMENT="$1"
  shift
fi
WORKDIR="runs/$(basename "${EXPERIMENT%.py}")"
ARGS=()
LAUNCH=()
NO_EVALUATE=""  # set by the flags after which there is no finished run here to evaluate
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --processes|--devices-per-process|--stop-grace|--tpu|--zone|--project|--revision|--worker)
      LAUNCH+=("$1" "$2"); shift 2 ;;
    --dry-run|--follow) LAUNCH+=("$1"); shift ;;
    --detach|--status|--logs|--stop) LAUNCH+=("$1"); NO_EVALUATE=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
TRAIN=(jaxformer train --config "$EXPERIMENT" --workdir "$WORKDIR" ${ARGS[@]+"${ARGS[@]}"})
EVALUATE=(jaxformer evaluate --workdir "$WORKDIR" --split test --samples 5)

if [[ " ${LAUNCH[*]-} " == *" --tpu "* ]]; then
  # The TPU workers set up their own environment; here only the launcher's few imports run.
  PY=python3
  PYTHONPATH="$ROOT" exec "$PY" -m jaxformer.launcher ${LAUNCH[@]+"${LAUNCH[@]}"} -- "${TRAIN[@]}"
fi
setup_env
if [[ -n "$NO_EVALUATE" ]]; then
  # A detached pod goes on after the launcher returns; status, logs and stop only look or ask.
  exec "$PY" -m jaxformer.launcher "${LAUNCH[@]}" -- "$PY" -m "${TRAIN[@]}"
fi
if [[ ${#LAUNCH[@]} -gt 0 ]]; then
  "$PY" -m jaxformer.launcher "${LAUNCH[@]}" -- "$PY" -m "${TRAIN[@]}"
else
  "$PY" -m "${TRAIN[@]}"
fi
exec "$PY" -m "${EVALUATE[@]}"
