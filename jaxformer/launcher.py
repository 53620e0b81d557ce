"""Starting one jaxformer command on many processes: a simulated pod, or every TPU VM worker.

    python -m jaxformer.launcher --processes N [--devices-per-process M] [--stop-grace S]
                                 -- COMMAND...
    python -m jaxformer.launcher --tpu NAME --zone ZONE [--project P] [--revision REV]
                                 [--dry-run] -- jaxformer ARGS...

A simulated pod runs COMMAND as N local processes with M CPU devices each, joined by
jax.distributed through a coordinator on 127.0.0.1 at a free port: exactly what the hosts of a
TPU pod do, on one machine. Each process learns its place from three environment variables,
which are also how one process per host is started on a GPU cluster, by hand or by a scheduler:

    JAXFORMER_COORDINATOR_ADDRESS=host:port  JAXFORMER_NUM_PROCESSES=N  JAXFORMER_PROCESS_ID=i

(`jaxformer/devices.py: initialize_distributed` reads them.) Output lines are prefixed
with the process id, `[i] `; the launcher's own lines (stderr) with `launcher: `. If a process
fails, the others are stopped (SIGTERM, then SIGKILL after --stop-grace seconds) and the
launcher exits with the failing process's status. Ctrl-C (or SIGTERM) of the launcher asks
every process to save a checkpoint and stop; a second one kills them. If the launcher itself is
killed, Linux kills its processes too (no orphans).

On a TPU VM pod the command runs on every worker through `gcloud compute tpus tpu-vm ssh
--worker=all`: the code is copied (or a git revision checked out), a Python environment with
the `tpu` extra is set up, and the command started with JAXFORMER_DISTRIBUTED=auto (JAX finds
its peers by itself there). `--dry-run` prints these commands without running them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxformer.errors import EXIT_FINISHED, EXIT_STOPPED, JaxformerError

STOP_GRACE_SECONDS = 10.0  # after a failure, how long the others get to stop before SIGKILL.
POLL_SECONDS = 0.1         # how often the launcher looks at its processes.
PUMP_JOIN_SECONDS = 5.0    # how long the last output of stopped processes may take to arrive.
REMOTE_DIR = "~/jaxformer"  # where the code lives on every TPU VM worker.
REMOTE_PYTHON = "3.11"     # the Python of the workers' environment (uv fetches it if missing).
CONSTRAINTS = "constraints.txt"  # the tested versions (tools/constraints.py writes it).
UNPINNED_VARIABLE = "JAXFORMER_UNPINNED"  # set (not 0): install without CONSTRAINTS.
SHARED_STORAGE_PREFIX = "gs://"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # CPU devices of one process.
_PR_SET_PDEATHSIG = 1      # prctl(2) option: the signal a process gets when its parent dies.
_OUTPUT_LOCK = threading.Lock()  # One line at a time from the processes' pumps and the launcher.


class _Parser(argparse.ArgumentParser):
  """argparse that reports bad arguments as a JaxformerError (one line, exit 2)."""

  def error(self, message):
    raise JaxformerError(f"launcher: {message}")


class _Interrupted(Exception):
  """The launcher got SIGINT or SIGTERM."""


# --- A simulated pod. ----------------------------------------------------------------------------

def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _exit_status(code: int) -> int:
  """A child's return code as a shell shows it: -9 (killed by SIGKILL) -> 137."""
  return 128 - code if code < 0 else code


def _dies_with_launcher(parent_pid: int):
  """A preexec_fn: on Linux the child is SIGKILLed when the launcher dies, even by SIGKILL.

  Runs in the child between fork and exec; the pods' processes are all started before any
  thread of the launcher, so nothing here can meet a lock held by another thread.
  """
  if not sys.platform.startswith("linux"):
    return None
  libc = ctypes.CDLL(None, use_errno=True)  # Loaded before the fork.

  def preexec():
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # The launcher died before prctl took effect.
      os._exit(1)
  return preexec


def _start_process(command: list[str], index: int, processes: int, devices: int,
                   address: str) -> subprocess.Popen:
  """Starts process `index` of the pod: `devices` CPU devices, told where it belongs."""
  xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
               if not flag.startswith(DEVICE_COUNT_FLAG)]  # The user's other flags stay.
  env = dict(os.environ,
             JAXFORMER_COORDINATOR_ADDRESS=address,
             JAXFORMER_NUM_PROCESSES=str(processes),
             JAXFORMER_PROCESS_ID=str(index),
             JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1",
             XLA_FLAGS=" ".join([*xla_flags, f"{DEVICE_COUNT_FLAG}={devices}"]))
  try:
    # Its own session: a Ctrl-C in the terminal reaches the launcher only, which decides.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True,
                            preexec_fn=_dies_with_launcher(os.getpid()))
  except OSError as e:
    raise JaxformerError(f"cannot start {shlex.join(command)}: {e}") from None


def _pump(process: subprocess.Popen, prefix: str) -> None:
  """Copies a process's output to stdout, line by line, each line prefixed."""
  for line in iter(process.stdout.readline, ""):
    with _OUTPUT_LOCK:
      sys.stdout.write(f"{prefix}{line}")
      sys.stdout.flush()


def _say(message: str) -> None:
  """One line of the launcher's own on stderr, never in the middle of a process's line.

  Not jaxformer.log: that imports jax, which `--tpu` runs without (the system's python3, see
  launch.sh), and which would add seconds to every launch for one print.
  """
  with _OUTPUT_LOCK:
    print(f"launcher: {message}", file=sys.stderr, flush=True)


def _signal(children: list[subprocess.Popen], signum: int) -> None:
  for child in children:
    if child.poll() is None:
      try:
        os.killpg(child.pid, signum)
      except ProcessLookupError:
        pass


def _stop(children: list[subprocess.Popen], grace: float | None) -> None:
  """SIGTERM to every running process (they save a checkpoint and stop); SIGKILL to those still
  running after `grace` seconds (None: wait as long as they take)."""
  _signal(children, signal.SIGTERM)
  deadline = None if grace is None else time.monotonic() + grace
  for child in children:
    try:
      child.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      break
  _signal(children, signal.SIGKILL)
  for child in children:
    child.wait()


def _wait_for_pod(children: list[subprocess.Popen], stop_grace: float) -> int:
  """Waits for every process; on the first failure stops the others. Returns the exit status:
  0 when all finished, EXIT_STOPPED when they stopped at a saved step (the processes of a pod
  agree on it), else the first failing process's."""
  status = EXIT_FINISHED
  running = set(range(len(children)))
  while running:
    for i in sorted(running):
      code = children[i].poll()
      if code is None:
        continue
      running.discard(i)
      if code == EXIT_STOPPED and status == EXIT_FINISHED:
        status = EXIT_STOPPED  # The others stop at the same step: wait for them.
      elif code not in (EXIT_FINISHED, EXIT_STOPPED) and status in (EXIT_FINISHED, EXIT_STOPPED):
        status = _exit_status(code)
        _say(f"process {i} exited with status {status}; stopping the others")
        _stop(children, stop_grace)
    time.sleep(POLL_SECONDS)
  return status


def run_local_pod(command: list[str], processes: int, devices_per_process: int = 1,
                  stop_grace: float = STOP_GRACE_SECONDS) -> int:
  """Runs `command` as `processes` local processes of one jax.distributed job; returns the exit
  status (0, EXIT_STOPPED when every process stopped at a saved step, the first failing
  process's status, or 128 + signal when interrupted and not saved)."""
  if processes < 1 or devices_per_process < 1:
    raise JaxformerError("--processes and --devices-per-process must be at least 1")
  address = f"127.0.0.1:{free_port()}"
  _say(f"{processes} process(es) x {devices_per_process} CPU device(s), coordinator {address}")
  children = []
  try:
    for i in range(processes):
      children.append(_start_process(command, i, processes, devices_per_process, address))
  except JaxformerError:
    _stop(children, 0)
    raise
  pumps = [threading.Thread(target=_pump, args=(child, f"[{i}] "), daemon=True)
           for i, child in enumerate(children)]
  for pump in pumps:
    pump.start()

  def interrupted(signum, frame):
    del frame
    raise _Interrupted(signum)

  previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    status = _wait_for_pod(children, stop_grace)
  except _Interrupted as e:
    _say("interrupted; every process saves a checkpoint and stops (interrupt again to kill "
         "them)")
    try:
      _stop(children, grace=None)
    except _Interrupted:
      _stop(children, grace=0)
    saved = all(child.returncode == EXIT_STOPPED for child in children)
    status = EXIT_STOPPED if saved else 128 + e.args[0]
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  for pump in pumps:
    pump.join(timeout=PUMP_JOIN_SECONDS)
  return status


# --- Every worker of a TPU VM. -------------------------------------------------------------------

def jaxformer_args(command: list[str]) -> list[str]:
  """The arguments after `jaxformer` in `command` (`jaxformer train ...` or `python -m
  jaxformer train ...`): on the workers they run as `.venv/bin/python -m jaxformer ARGS`."""
  if "jaxformer" not in command:
    raise JaxformerError(f"--tpu runs a jaxformer command on the workers (e.g. -- jaxformer "
                         f"train --config EXPERIMENT --workdir gs://BUCKET/RUN); got "
                         f"{shlex.join(command)}")
  return command[command.index("jaxformer") + 1:]


def workdir_of(args: list[str]) -> str | None:
  """The value of --workdir in a jaxformer command line, if any."""
  for i, arg in enumerate(args):
    if arg == "--workdir" and i + 1 < len(args):
      return args[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  return None


def pins_arg() -> str:
  """'-c constraints.txt ' (the tested versions, as ./launch.sh installs them), or '' when
  JAXFORMER_UNPINNED is set here. The TPU-only packages (libtpu, gcsfs ...) are not in the file:
  they resolve to what the pinned jax[tpu] and pyproject allow."""
  return "" if os.environ.get(UNPINNED_VARIABLE, "0") not in ("", "0") else f"-c {CONSTRAINTS} "


def tpu_commands(args: list[str], name: str, zone: str, project: str | None,
                 revision: str | None, source_dir: str) -> list[list[str]]:
  """The commands that put the code on every worker of TPU VM `name`, set it up, and run
  `jaxformer ARGS` there, one process per worker."""
  where = ["--zone", zone] + (["--project", project] if project else [])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all", *where]
  if revision:
    # Every worker checks out the same revision of the same repository.
    remote = subprocess.run(["git", "-C", source_dir, "remote", "get-url", "origin"],
                            capture_output=True, text=True).stdout.strip()
    if not remote:
      raise JaxformerError("--revision needs a git remote 'origin' that the TPU workers can "
                           "clone; push the repository first, or leave --revision out to copy "
                           "the committed code")
    fetch = [[*ssh, "--command",
              f"test -d {REMOTE_DIR} || git clone {shlex.quote(remote)} {REMOTE_DIR}; "
              f"cd {REMOTE_DIR} && git fetch --all && git checkout {shlex.quote(revision)}"]]
  else:
    # The committed code (git archive HEAD), the same on every worker; no .venv, no runs/.
    archive = os.path.join("/tmp", f"jaxformer-{name}.tar.gz")
    fetch = [["git", "-C", source_dir, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
             ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{name}:jaxformer.tar.gz",
              "--worker=all", *where],
             [*ssh, "--command",
              f"mkdir -p {REMOTE_DIR} && tar xzf jaxformer.tar.gz -C {REMOTE_DIR}"]]
  # TPU VM images may ship an older Python than jaxformer needs; uv fetches the right one.
  uv = "~/.local/bin/uv"
  setup = [*ssh, "--command",
           f"cd {REMOTE_DIR} && python3 -m pip install -q --user uv && "
           f"(test -x .venv/bin/python || {uv} venv -q --python {REMOTE_PYTHON} .venv) && "
           f"{uv} pip install -q --python .venv/bin/python {pins_arg()}-e '.[tpu]'"]
  run = [*ssh, "--command",
         f"cd {REMOTE_DIR} && JAXFORMER_DISTRIBUTED=auto .venv/bin/python -m jaxformer "
         + shlex.join(args)]
  return [*fetch, setup, run]


def _warn_about(args: list[str], revision: str | None, source_dir: str) -> None:
  """Warnings (stderr) for the two mistakes that cost a pod's time: a workdir every worker
  does not share, and local changes that `git archive HEAD` does not copy."""
  workdir = workdir_of(args)
  if workdir is not None and not workdir.startswith(SHARED_STORAGE_PREFIX):
    _say(f"warning: --workdir {workdir} is not on {SHARED_STORAGE_PREFIX}; every worker must "
         "see the same workdir (checkpoints are written by all of them), so use --workdir "
         f"{SHARED_STORAGE_PREFIX}BUCKET/RUN or a directory shared by all workers")
  if not revision:
    changes = subprocess.run(["git", "-C", source_dir, "status", "--porcelain",
                              "--untracked-files=no"], capture_output=True, text=True).stdout
    if changes.strip():
      _say("warning: uncommitted changes are not copied to the workers (only HEAD is); commit "
           "them first")


def run_on_tpu(command: list[str], name: str, zone: str, project: str | None,
               revision: str | None, dry_run: bool) -> int:
  """Prints each command of `tpu_commands` and (unless `dry_run`) runs it; stops at a failure."""
  source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = jaxformer_args(command)
  steps = tpu_commands(args, name, zone, project, revision, source_dir)
  _warn_about(args, revision, source_dir)
  for step in steps:
    print(shlex.join(step), flush=True)
    if not dry_run:
      try:
        code = subprocess.run(step).returncode
      except FileNotFoundError:
        raise JaxformerError(f"{step[0]} is not installed (the Google Cloud CLI provides "
                             "gcloud: https://cloud.google.com/sdk/docs/install)") from None
      if code:
        return code
  return 0


# --- The command line. ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m jaxformer.launcher", description=__doc__.splitlines()[0])
  pod = parser.add_argument_group("a simulated pod on this machine")
  pod.add_argument("--processes", type=int, default=None, metavar="N")
  pod.add_argument("--devices-per-process", type=int, default=None, metavar="M",
                   help="CPU devices of each process (default 1)")
  pod.add_argument("--stop-grace", type=float, default=STOP_GRACE_SECONDS, metavar="SECONDS",
                   help="after a process fails, how long the others get to stop before they "
                        f"are killed (default {STOP_GRACE_SECONDS:g})")
  tpu = parser.add_argument_group("every worker of an existing TPU VM")
  tpu.add_argument("--tpu", default=None, metavar="NAME", help="the TPU VM's name")
  tpu.add_argument("--zone", default=None, help="its zone, e.g. us-central2-b")
  tpu.add_argument("--project", default=None, help="its Google Cloud project (default: "
                   "gcloud's)")
  tpu.add_argument("--revision", default=None,
                   help="a git revision the workers check out (default: copy HEAD)")
  tpu.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: the command (a simulated pod), or jaxformer ARGS (--tpu)")
  return parser


def _check(args: argparse.Namespace, command: list[str]) -> None:
  """One clear error for each way the options do not fit together."""
  if args.tpu and args.processes is not None:
    raise JaxformerError("choose --processes N (a simulated pod) or --tpu NAME (a TPU VM), "
                         "not both")
  tpu_only = [f"--{k.replace('_', '-')}" for k in ("zone", "project", "revision", "dry_run")
              if getattr(args, k)]
  if not args.tpu and tpu_only:
    verb = "applies" if len(tpu_only) == 1 else "apply"
    raise JaxformerError(f"{', '.join(tpu_only)} {verb} only with --tpu NAME")
  if not args.tpu and args.processes is None:
    raise JaxformerError("say --processes N (a simulated pod on this machine) or --tpu NAME "
                         "--zone ZONE (every worker of a TPU VM)")
  if args.tpu and not args.zone:
    raise JaxformerError("--tpu needs --zone (the TPU VM's zone, e.g. us-central2-b)")
  if args.tpu and args.devices_per_process is not None:
    raise JaxformerError("--devices-per-process is for a simulated pod (--processes); a TPU VM "
                         "worker uses all its chips")
  if not command:
    raise JaxformerError("no command to launch; put it after --, e.g. -- jaxformer train "
                         "--config default --workdir runs/default")
  if args.tpu and "--dry-run" in command:
    raise JaxformerError("--dry-run is an option of the launcher: put it before --")


def main(argv: list[str] | None = None) -> int:
  try:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _check(args, command)
    if args.tpu:
      return run_on_tpu(command, args.tpu, args.zone, args.project, args.revision, args.dry_run)
    return run_local_pod(command, args.processes, args.devices_per_process or 1,
                         args.stop_grace)
  except JaxformerError as e:
    print(f"error: {e}", file=sys.stderr)  # As jaxformer.cli says it (no 'launcher: ' prefix).
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
