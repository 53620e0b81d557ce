"""Starting one jaxformer command on many processes: a simulated pod, or every TPU VM worker.

    python -m jaxformer.launcher --processes N [--devices-per-process M] [--stop-grace S]
                                 [--detach] -- COMMAND...
    python -m jaxformer.launcher --tpu NAME --zone ZONE [--project P] [--revision REV]
                                 [--dry-run] -- jaxformer ARGS...
    either of these, plus --status | --logs [--worker I] [--follow] | --stop

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
its peers by itself there), detached: each worker's trainer runs in a session of its own, with
no terminal, under a small wrapper that records its pid and exit status beside its log, so a
dropped connection or a sleeping laptop does not end a run of days; the launcher returns once
every worker has started. `--detach` does the same for a simulated pod, so that the whole flow
is tested on one machine. Then the same command plus `--status`, `--logs` or `--stop` looks at
or stops the run, on every worker at once (see "Detached runs" below for the files and
commands). `--dry-run` prints these commands without running them.

This module imports no jax: `--tpu` runs it with the system's python3 (launch.sh), and on the
workers its helpers run beside the trainer.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxformer.errors import EXIT_FINISHED, EXIT_STOPPED, EXIT_USER_ERROR, JaxformerError

STOP_GRACE_SECONDS = 10.0  # after a failure, how long the others get to stop before SIGKILL.
POLL_SECONDS = 0.1         # how often the launcher looks at its processes.
PUMP_JOIN_SECONDS = 5.0    # how long the last output of stopped processes may take to arrive.
REMOTE_DIR = "~/jaxformer"  # where the code lives on every TPU VM worker.
REMOTE_VENV_PYTHON = ".venv/bin/python"  # its environment's Python, from REMOTE_DIR.
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


def _process_env(index: int, processes: int, devices: int, address: str) -> dict[str, str]:
  """The environment of process `index` of the pod: `devices` CPU devices, told where it
  belongs."""
  xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
               if not flag.startswith(DEVICE_COUNT_FLAG)]  # The user's other flags stay.
  return dict(os.environ,
              JAXFORMER_COORDINATOR_ADDRESS=address,
              JAXFORMER_NUM_PROCESSES=str(processes),
              JAXFORMER_PROCESS_ID=str(index),
              JAX_PLATFORMS="cpu",
              PYTHONUNBUFFERED="1",
              XLA_FLAGS=" ".join([*xla_flags, f"{DEVICE_COUNT_FLAG}={devices}"]))


def _start_process(command: list[str], index: int, processes: int, devices: int,
                   address: str) -> subprocess.Popen:
  """Starts process `index` of the pod, its output piped to the launcher."""
  env = _process_env(index, processes, devices, address)
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
  for i, child in enumerate(children):  # How each process ended, as --status says it.
    code = _exit_status(child.returncode)
    state, advice = _ended(code)
    _say(f"process {i}: {state} (exit {code}{'; ' + advice if advice else ''})")
  return status


# --- Detached runs: the files of each worker, and the shell that starts, stops and reads them. --
#
# A detached worker is a small wrapper (`python -m jaxformer.launcher _worker`) in a session of
# its own, started by `setsid nohup ... < /dev/null >> LOG 2>&1 &`: no terminal, no ssh session
# and no launcher whose end could end it. The wrapper starts the trainer (its output goes to
# LOG), writes the trainer's pid beside the log, waits for it, and writes its exit status there
# too. The same shell lines (below) run on a TPU VM worker through `gcloud ... ssh` and on this
# machine for a simulated pod, so the local tests run the very commands a pod runs.
#
#   <log dir>/worker_<i>.log    everything worker i's trainer printed; one header line per start
#   <log dir>/worker_<i>.pid    the trainer's pid, once it has started
#   <log dir>/worker_<i>.exit   its exit status, once it has ended

LOGS_DIR = "logs"  # jaxformer.workdir.LOGS_DIR, which cannot be imported here (workdir imports
                   # jax); tests/test_launcher.py checks that the two agree.
LOG_COPY_SECONDS = 60.0       # how often a wrapper copies its log to a gs:// workdir.
LOG_COPY_TIMEOUT_S = 120.0    # one copy that takes longer is given up (the next one retries).
START_TIMEOUT_SECONDS = 60.0  # how long a start waits for the wrapper to report the trainer.
PID_REUSE_SLACK_SECONDS = 60.0  # a pid whose process started later than this after the pid
                                # file was written is another process (after a reboot).
LOG_TAIL_BYTES = 8 << 20      # how much of a log `--status` reads (its end).
STARTED = "launcher: worker {index} started"  # the header the wrapper writes at each start.
# The steps a log names: the loop's `step N: ...` lines, and its last line, which names the step
# it saved when stopped between two logged ones (process 0 logs them all).
STEP_LINE = re.compile(r"^(?:step |jaxformer: stopped by .+ at step |jaxformer: trained to step )"
                       r"(\d+)\b")
# A TPU VM worker's index: TPU_WORKER_ID where the environment sets it (GKE), else the GCE
# metadata server's agent-worker-number, which is what jax.distributed reads on a TPU VM
# (jax/_src/clusters/cloud_tpu_cluster.py) and how `gcloud ... ssh --worker=i` numbers the
# workers; so log i, process i and `--worker i` are one machine.
TPU_WORKER_INDEX = ('${TPU_WORKER_ID:-$(curl -sf -H "Metadata-Flavor: Google" '
                    'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                    'agent-worker-number)}')


def log_places(workdir: str, remote_logs: str) -> tuple[str, str | None]:
  """(the directory the workers write their logs to, the gs:// directory those are copied to).

  A workdir on a file system gets the logs in `<workdir>/logs` directly. Objects on gs:// cannot
  be appended to, so there each worker writes to its own disk, under `remote_logs` (a path
  named after the workdir, so that two runs keep two sets of logs), and copies to
  `<workdir>/logs`.
  """
  workdir = workdir.rstrip("/")
  if workdir.startswith(SHARED_STORAGE_PREFIX):
    return (os.path.join(remote_logs, workdir[len(SHARED_STORAGE_PREFIX):]),
            f"{workdir}/{LOGS_DIR}")
  return os.path.join(workdir, LOGS_DIR), None


def worker_log(log_dir: str, index: int | str) -> str:
  return os.path.join(log_dir, f"worker_{index}.log")


def sibling(log: str, suffix: str) -> str:
  """The pid (".pid") or exit-status (".exit") file beside a worker's log."""
  return log.removesuffix(".log") + suffix


def _script_start(index: str, log_dir: str) -> str:
  """Shell that sets I (this worker's index) and W (its files without the suffix)."""
  return (f'I={index}; case "$I" in ""|*[!0-9]*) echo "launcher: no index for this worker '
          f'(neither TPU_WORKER_ID nor the agent-worker-number of the metadata server)" >&2; '
          f'exit 1;; esac; W={shlex.quote(log_dir)}/worker_$I; ')


def start_script(python: str, log_dir: str, copy_to: str | None, command: list[str],
                 index: str, env: str = "") -> str:
  """Shell that starts worker `index`'s trainer `command`, detached, and returns once it runs.

  A trainer still running there is left alone (its pid file would be lost); the old pid and
  exit files are removed first, so that what the wrapper writes is this run's. `$!` is the
  wrapper's pid: in a shell without job control (ssh --command, sh -c) a background command
  leads no process group, so setsid(1) calls setsid() itself instead of forking first.
  """
  helper = f"{shlex.quote(python)} -m jaxformer.launcher"
  copy = f" --copy-to {shlex.quote(copy_to)}" if copy_to else ""
  return (_script_start(index, log_dir)
          + f'mkdir -p {shlex.quote(log_dir)} || exit 1; '
          f'if {helper} _running --log "$W.log"; then echo "worker $I: already running (pid '
          f'$(cat "$W.pid")); stop it first (--stop)" >&2; exit 1; fi; '
          f'rm -f "$W.pid" "$W.exit"; '
          f'{env}setsid nohup {helper} _worker --worker "$I" --log "$W.log"{copy} -- '
          f'{shlex.join(command)} < /dev/null >> "$W.log" 2>&1 & '
          f'{helper} _started --worker "$I" --wrapper $! --log "$W.log"')


def status_script(python: str, log_dir: str, index: str) -> str:
  """Shell that prints worker `index`'s one line of `--status`."""
  return (_script_start(index, log_dir)
          + f'{shlex.quote(python)} -m jaxformer.launcher _status --worker "$I" --log "$W.log"')


def stop_script(python: str, log_dir: str, index: str) -> str:
  """Shell that sends SIGTERM to worker `index`'s trainer, if it is still running: the trainer
  saves a checkpoint at a step all workers agree on and exits as stopped."""
  return (_script_start(index, log_dir)
          + f'if {shlex.quote(python)} -m jaxformer.launcher _running --log "$W.log"; then '
          f'kill -TERM "$(cat "$W.pid")" && echo "worker $I: sent SIGTERM to the trainer (pid '
          f'$(cat "$W.pid"))"; else echo "worker $I: not running"; fi')


def logs_script(log_dir: str, index: int, follow: bool) -> str:
  """Shell that prints worker `index`'s log (and, with `follow`, what it writes next)."""
  log = shlex.quote(worker_log(log_dir, index))
  return (f'test -f {log} || {{ echo "launcher: worker {index} has no log {log}" >&2; '
          f'exit 1; }}; exec tail -n +1{" -f" if follow else ""} {log}')


# --- The worker side: what runs on each worker, beside its trainer. ------------------------------

def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except (FileNotFoundError, NotADirectoryError):
    return None


def _write(path: str, text: str) -> None:
  """Writes `text` to `path` whole: a reader sees the old file or the new one, never a part."""
  with open(f"{path}.tmp", "w") as f:
    f.write(text + "\n")
  os.replace(f"{path}.tmp", path)


def _proc_stat(pid: int) -> list[str] | None:
  """The fields of /proc/<pid>/stat after the command name (state first); None without /proc
  (not Linux) or for no such process."""
  stat = _read(f"/proc/{pid}/stat")
  return None if stat is None else stat.rsplit(")", 1)[1].split()


def _is_alive(pid: int) -> bool:
  """Whether `pid` is a live process (a zombie, ended and not yet reaped, is not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Someone else's process: alive.
  fields = _proc_stat(pid)
  return fields is None or fields[0] != "Z"


def _started_after(pid: int, when: float) -> bool:
  """Whether process `pid` started well after time `when` (Linux; elsewhere: no)."""
  fields, boot = _proc_stat(pid), _read("/proc/stat")
  if fields is None or boot is None:
    return False
  btime = next(float(line.split()[1]) for line in boot.splitlines() if line.startswith("btime"))
  started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5).
  return started > when + PID_REUSE_SLACK_SECONDS


def trainer_pid(log: str) -> int | None:
  """The pid of the trainer of worker log `log` if it is running, else None.

  Running: its pid file is there, its exit file is not, and that pid is alive and no younger
  than the pid file (after a reboot the number may belong to another process).
  """
  pid_file = sibling(log, ".pid")
  pid = _read(pid_file)
  if not pid or not pid.isdigit() or os.path.exists(sibling(log, ".exit")):
    return None
  try:
    written = os.path.getmtime(pid_file)
  except FileNotFoundError:
    return None
  if not _is_alive(int(pid)) or _started_after(int(pid), written):
    return None
  return int(pid)


def _copy_logs(files: list[str], copy_to: str, failed: bool) -> bool:
  """Copies `files` into the gs:// directory `copy_to`; returns whether the copy failed.

  A failure is said (in the log) once, until a copy works again: the network may be down for a
  while, and the run goes on without its copy.
  """
  command = ["gcloud", "storage", "cp", "--quiet", *files, f"{copy_to}/"]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=LOG_COPY_TIMEOUT_S)
    problem = result.stderr.strip().splitlines()[-1:] if result.returncode else None
  except (OSError, subprocess.TimeoutExpired) as e:
    problem = [str(e)]
  if problem is not None and not failed:
    _say(f"copying the log to {copy_to} failed ({''.join(problem)}); retrying every "
         f"{LOG_COPY_SECONDS:g} s")
  return problem is not None


def _ignore_signal(signum, frame) -> None:
  del signum, frame


def run_worker(index: int, log: str, copy_to: str | None, command: list[str],
               copy_every: float = LOG_COPY_SECONDS) -> int:
  """The detached wrapper: runs the trainer `command` (its output is the wrapper's, the log),
  writes its pid and then its exit status beside `log`, copies the log to `copy_to` every
  `copy_every` seconds and at the end; returns the trainer's exit status."""
  one_line = shlex.join(command).replace("\n", "\\n")  # The header is one line of the log.
  _say(f"{STARTED.format(index=index).removeprefix('launcher: ')} on {socket.gethostname()} "
       f"at {time.strftime('%Y-%m-%d %H:%M:%S')}: {one_line}")
  try:
    trainer = subprocess.Popen(command)
  except OSError as e:
    _say(f"worker {index}: cannot start {shlex.join(command)}: {e}")
    _write(sibling(log, ".exit"), "127")
    return 127
  _write(sibling(log, ".pid"), str(trainer.pid))
  # A SIGTERM, SIGINT or SIGHUP to the wrapper's process group reaches the trainer as well, and
  # the trainer decides; the wrapper stays to write down how it ended.
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, _ignore_signal)
  failed, copied = False, None
  while True:
    try:
      code = trainer.wait(timeout=copy_every if copy_to else None)
      break
    except subprocess.TimeoutExpired:
      seen = (os.stat(log).st_size, os.stat(log).st_mtime)
      if seen != copied:  # Nothing new since the last copy that worked: nothing to copy.
        failed = _copy_logs([log], copy_to, failed)
        copied = None if failed else seen
  status = _exit_status(code)
  _say(f"worker {index}: the trainer ended with exit status {status} ({_ended(status)[0]})")
  _write(sibling(log, ".exit"), str(status))
  if copy_to:
    _copy_logs([log, sibling(log, ".exit")], copy_to, False)
  return status


def wait_started(index: int, log: str, wrapper: int,
                 timeout: float = START_TIMEOUT_SECONDS) -> int:
  """Waits until the wrapper `wrapper` has started worker `index`'s trainer; says so (or why
  not) in one line; returns 0 once it runs."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(sibling(log, ".pid")) and not os.path.exists(sibling(log, ".exit")):
    if not _is_alive(wrapper) or time.monotonic() > deadline:
      print(f"worker {index}: did not start; see {log}", file=sys.stderr, flush=True)
      return 1
    time.sleep(POLL_SECONDS)
  pid = _read(sibling(log, ".pid"))
  if pid is None:
    print(f"worker {index}: did not start; see {log}", file=sys.stderr, flush=True)
    return 1
  print(f"worker {index}: started (pid {pid}), log {os.path.abspath(log)}", flush=True)
  return 0


def _ended(status: int) -> tuple[str, str]:
  """(state, what to do) of a trainer that ended with exit status `status` (README, "When things
  go wrong", "Exit statuses")."""
  if status == EXIT_FINISHED:
    return "finished", ""
  if status == EXIT_STOPPED:
    return "stopped", "run the same command to resume"
  if status == EXIT_USER_ERROR:
    return "error", ""
  return "failed", ""


def _this_run(log: str, index: int) -> list[str]:
  """The lines of `log` since its newest start header (the end of a long log only)."""
  try:
    with open(log, "rb") as f:
      f.seek(max(0, os.path.getsize(log) - LOG_TAIL_BYTES))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except FileNotFoundError:
    return []
  header = STARTED.format(index=index)
  starts = [i for i, line in enumerate(lines) if line.startswith(header)]
  return lines[starts[-1] + 1:] if starts else lines


def worker_status(index: int, log: str) -> str:
  """Worker `index`'s line of `--status`: running / finished / stopped / error / failed, its
  exit status, the last step its log names, and for an error or a crash, the log's last word.
  """
  lines = _this_run(log, index)
  steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
  step = f", step {steps[-1]}" if steps else ""
  pid, status = trainer_pid(log), _read(sibling(log, ".exit"))
  if pid is not None:
    return f"worker {index}: running (pid {pid}){step}"
  if status is None or not status.lstrip("-").isdigit():
    if _read(sibling(log, ".pid")) is None:
      return f"worker {index}: not started ({log} has no pid file)"
    return (f"worker {index}: failed (no exit status: the trainer and its wrapper were killed, "
            f"or the machine restarted){step}; see {log}")
  state, advice = _ended(int(status))
  said = ""
  if state == "error":
    errors = [line for line in lines if line.startswith("error:")]
    said = f": {errors[-1]}" if errors else ""
  elif state == "failed":
    own = [line for line in lines if line.strip() and not line.startswith("launcher:")]
    said = f": {own[-1].strip()}" if own else ""
  return (f"worker {index}: {state} (exit {status}{'; ' + advice if advice else ''}){step}"
          f"{said}")


def worker_main(argv: list[str]) -> int:
  """The helpers the shell lines above call on a worker: `_worker --log LOG ... -- COMMAND`
  (the wrapper), `_started`, `_running` (exit status 0 if the trainer runs) and `_status`."""
  own, command = argv, []
  if "--" in argv:
    own, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  parser = _Parser(prog="python -m jaxformer.launcher")
  parser.add_argument("helper", choices=["_worker", "_started", "_running", "_status"])
  parser.add_argument("--log", required=True, help="the worker's log file")
  parser.add_argument("--worker", type=int, default=0, help="the worker's index")
  parser.add_argument("--copy-to", default=None, help="_worker: a gs:// directory")
  parser.add_argument("--copy-every", type=float, default=LOG_COPY_SECONDS,
                      help="_worker: seconds between copies")
  parser.add_argument("--wrapper", type=int, default=None, help="_started: the wrapper's pid")
  args = parser.parse_args(own)
  if args.helper == "_worker":
    return run_worker(args.worker, args.log, args.copy_to, command, args.copy_every)
  if args.helper == "_started":
    return wait_started(args.worker, args.log, args.wrapper)
  if args.helper == "_running":
    return 0 if trainer_pid(args.log) is not None else 1
  print(worker_status(args.worker, args.log), flush=True)
  return 0


# --- A detached simulated pod. -------------------------------------------------------------------

def _local_log_dir(command: list[str], what: str) -> str:
  """The log directory of the detached pod that `command` (with its --workdir) runs."""
  workdir = workdir_of(command)
  if workdir is None:
    raise JaxformerError(f"{what} needs the run's --workdir in the command (the same command "
                         "that started it)")
  if workdir.startswith(SHARED_STORAGE_PREFIX):
    raise JaxformerError(f"{what} of a simulated pod keeps the logs in the workdir; use a local "
                         f"--workdir, not {workdir}")
  return log_places(workdir, "")[0]


def _sh(script: str, env: dict[str, str] | None = None) -> int:
  """Runs one of the shell lines above here, as a worker's ssh session would."""
  return subprocess.run(["sh", "-c", script], env=env).returncode


def start_local_pod(command: list[str], processes: int, devices_per_process: int = 1) -> int:
  """Starts `command` as a detached simulated pod (each process a detached worker, logging to
  `<workdir>/logs/worker_<i>.log`); returns once every process runs."""
  if processes < 1 or devices_per_process < 1:
    raise JaxformerError("--processes and --devices-per-process must be at least 1")
  log_dir = _local_log_dir(command, "--detach")
  if shutil.which("setsid") is None:
    raise JaxformerError("--detach needs the setsid command (util-linux)")
  for i in range(processes):
    pid = trainer_pid(worker_log(log_dir, i))
    if pid is not None:
      raise JaxformerError(f"worker {i} of this workdir is still running (pid {pid}); stop it "
                           "first (--stop) or wait for it to end (--status)")
  address = f"127.0.0.1:{free_port()}"
  _say(f"{processes} process(es) x {devices_per_process} CPU device(s), coordinator {address}, "
       f"detached; logs in {log_dir}")
  for i in range(processes):
    script = start_script(sys.executable, log_dir, None, command, str(i))
    status = _sh(script, _process_env(i, processes, devices_per_process, address))
    if status:
      for j in range(i):  # Those started would wait for the missing one until they time out.
        _sh(stop_script(sys.executable, log_dir, str(j)))
      return status
  _say("every process started; see them with --status, --logs [--worker i] [--follow], stop "
       "them with --stop")
  return 0


def local_pod_action(action: str, command: list[str], processes: int, worker: int | None,
                     follow: bool) -> int:
  """--status, --logs or --stop of the detached simulated pod that `command` started."""
  log_dir = _local_log_dir(command, f"--{action}")
  if action == "status":
    for i in range(processes):
      print(worker_status(i, worker_log(log_dir, i)), flush=True)
    return 0
  if action == "logs":
    try:
      return _sh(logs_script(log_dir, worker or 0, follow))
    except KeyboardInterrupt:  # Ctrl-C ends a --follow.
      return 0
  status = 0
  for i in range(processes):
    status = _sh(stop_script(sys.executable, log_dir, str(i))) or status
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


def _where(zone: str, project: str | None) -> list[str]:
  return ["--zone", zone] + (["--project", project] if project else [])


def _ssh(name: str, zone: str, project: str | None, worker: int | str = "all") -> list[str]:
  """`gcloud ... ssh` to one worker of TPU VM `name`, or to all of them (the same command on
  each, at the same time)."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--worker={worker}",
          *_where(zone, project)]


def _in_remote_dir(script: str) -> str:
  return f"cd {REMOTE_DIR} || exit 1; {script}"


def tpu_log_places(args: list[str]) -> tuple[str, str | None]:
  """(the workers' log directory, relative to REMOTE_DIR, or absolute; the gs:// directory the
  logs are copied to) of the run `jaxformer ARGS`."""
  workdir = workdir_of(args)
  if workdir is None:
    raise JaxformerError("--tpu needs the run's --workdir in the command (gs://BUCKET/RUN): the "
                         "workers' logs, and their copies, are named after it")
  return log_places(workdir, LOGS_DIR)


def _fetch_commands(ssh: list[str], where: list[str], name: str, revision: str | None,
                    source_dir: str) -> list[list[str]]:
  """The commands that put the same code on every worker: HEAD, or a revision of origin."""
  if revision:
    # Every worker checks out the same revision of the same repository.
    remote = subprocess.run(["git", "-C", source_dir, "remote", "get-url", "origin"],
                            capture_output=True, text=True).stdout.strip()
    if not remote:
      raise JaxformerError("--revision needs a git remote 'origin' that the TPU workers can "
                           "clone; push the repository first, or leave --revision out to copy "
                           "the committed code")
    return [[*ssh, "--command",
             f"test -d {REMOTE_DIR} || git clone {shlex.quote(remote)} {REMOTE_DIR}; "
             f"cd {REMOTE_DIR} && git fetch --all && git checkout {shlex.quote(revision)}"]]
  # The committed code (git archive HEAD), the same on every worker; no .venv, no runs/.
  archive = os.path.join("/tmp", f"jaxformer-{name}.tar.gz")
  return [["git", "-C", source_dir, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{name}:jaxformer.tar.gz",
           "--worker=all", *where],
          [*ssh, "--command",
           f"mkdir -p {REMOTE_DIR} && tar xzf jaxformer.tar.gz -C {REMOTE_DIR}"]]


def tpu_commands(args: list[str], name: str, zone: str, project: str | None,
                 revision: str | None, source_dir: str) -> list[list[str]]:
  """The commands that put the code on every worker of TPU VM `name`, set it up, and start
  `jaxformer ARGS` there detached, one process per worker (see start_script)."""
  ssh = _ssh(name, zone, project)
  fetch = _fetch_commands(ssh, _where(zone, project), name, revision, source_dir)
  # TPU VM images may ship an older Python than jaxformer needs; uv fetches the right one.
  uv = "~/.local/bin/uv"
  setup = [*ssh, "--command",
           f"cd {REMOTE_DIR} && python3 -m pip install -q --user uv && "
           f"(test -x .venv/bin/python || {uv} venv -q --python {REMOTE_PYTHON} .venv) && "
           f"{uv} pip install -q --python .venv/bin/python {pins_arg()}-e '.[tpu]'"]
  log_dir, copy_to = tpu_log_places(args)
  trainer = [REMOTE_VENV_PYTHON, "-m", "jaxformer", *args]
  start = [*ssh, "--command", _in_remote_dir(start_script(
      REMOTE_VENV_PYTHON, log_dir, copy_to, trainer, TPU_WORKER_INDEX,
      env="JAXFORMER_DISTRIBUTED=auto PYTHONUNBUFFERED=1 "))]
  return [*fetch, setup, start]


def tpu_action_commands(action: str, args: list[str], name: str, zone: str,
                        project: str | None, worker: int | None = None,
                        follow: bool = False) -> list[list[str]]:
  """The command of --status, --logs or --stop of the run `jaxformer ARGS` on TPU VM `name`."""
  log_dir, _ = tpu_log_places(args)
  if action == "logs":
    worker = worker or 0
    return [[*_ssh(name, zone, project, worker), "--command",
             _in_remote_dir(logs_script(log_dir, worker, follow))]]
  script = {"status": status_script, "stop": stop_script}[action]
  return [[*_ssh(name, zone, project), "--command",
           _in_remote_dir(script(REMOTE_VENV_PYTHON, log_dir, TPU_WORKER_INDEX))]]


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


def _run_gcloud(step: list[str], capture: bool = False) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(step, stdout=subprocess.PIPE if capture else None, text=True)
  except FileNotFoundError:
    raise JaxformerError(f"{step[0]} is not installed (the Google Cloud CLI provides "
                         "gcloud: https://cloud.google.com/sdk/docs/install)") from None


def _by_worker(output: str) -> str:
  """The `worker <i>: ...` lines of every worker (which come as they come), in worker order."""
  def key(line: str):
    m = re.match(r"worker (\d+):", line)
    return (0, int(m.group(1))) if m else (1, 0)
  return "".join(sorted(output.splitlines(keepends=True), key=key))


def run_on_tpu(command: list[str], name: str, zone: str, project: str | None,
               revision: str | None, dry_run: bool, action: str = "start",
               worker: int | None = None, follow: bool = False) -> int:
  """Prints each command of `action` (start: tpu_commands; status, logs, stop:
  tpu_action_commands) and (unless `dry_run`) runs it; stops at a failure."""
  source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = jaxformer_args(command)
  if action == "start":
    steps = tpu_commands(args, name, zone, project, revision, source_dir)
    _warn_about(args, revision, source_dir)
  else:
    steps = tpu_action_commands(action, args, name, zone, project, worker, follow)
  for step in steps:
    print(shlex.join(step), flush=True)
    if dry_run:
      continue
    try:
      result = _run_gcloud(step, capture=action == "status")
    except KeyboardInterrupt:  # Ctrl-C ends a --logs --follow; the run goes on.
      return 0 if action == "logs" else 130
    if result.stdout:
      sys.stdout.write(_by_worker(result.stdout))
    if result.returncode:
      return result.returncode
  if action == "start" and not dry_run:
    _say("every worker started, detached; the run goes on without this terminal. Add --status, "
         "--logs [--worker i] [--follow] or --stop to the same command to look at or stop it")
  return 0


# --- The command line. ---------------------------------------------------------------------------

ACTIONS = ("detach", "status", "logs", "stop")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m jaxformer.launcher", description=__doc__.splitlines()[0])
  pod = parser.add_argument_group("a simulated pod on this machine")
  pod.add_argument("--processes", type=int, default=None, metavar="N")
  pod.add_argument("--devices-per-process", type=int, default=None, metavar="M",
                   help="CPU devices of each process (default 1)")
  pod.add_argument("--stop-grace", type=float, default=STOP_GRACE_SECONDS, metavar="SECONDS",
                   help="after a process fails, how long the others get to stop before they "
                        f"are killed (default {STOP_GRACE_SECONDS:g})")
  pod.add_argument("--detach", action="store_true",
                   help="start the processes detached, logging to <workdir>/logs/, and return")
  tpu = parser.add_argument_group("every worker of an existing TPU VM (always detached)")
  tpu.add_argument("--tpu", default=None, metavar="NAME", help="the TPU VM's name")
  tpu.add_argument("--zone", default=None, help="its zone, e.g. us-central2-b")
  tpu.add_argument("--project", default=None, help="its Google Cloud project (default: "
                   "gcloud's)")
  tpu.add_argument("--revision", default=None,
                   help="a git revision the workers check out (default: copy HEAD)")
  tpu.add_argument("--dry-run", action="store_true", help="print the commands only")
  detached = parser.add_argument_group("a detached run (the command that started it, plus)")
  detached.add_argument("--status", action="store_true",
                        help="each worker: running, finished, stopped, error or failed, its "
                             "exit status and last logged step")
  detached.add_argument("--logs", action="store_true", help="print a worker's log")
  detached.add_argument("--worker", type=int, default=None, metavar="I",
                        help="--logs: the worker (default 0)")
  detached.add_argument("--follow", action="store_true", help="--logs: and what comes next")
  detached.add_argument("--stop", action="store_true",
                        help="SIGTERM to every worker's trainer: they save at one step and "
                             "exit as stopped")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: the command (a simulated pod), or jaxformer ARGS (--tpu)")
  return parser


def _check_detached(args: argparse.Namespace) -> None:
  """The errors of --detach, --status, --logs, --worker, --follow and --stop."""
  actions = [f"--{a}" for a in ACTIONS if getattr(args, a)]
  if len(actions) > 1:
    raise JaxformerError(f"choose one of {', '.join(actions)}")
  for option in ("worker", "follow"):
    if getattr(args, option) not in (None, False) and not args.logs:
      raise JaxformerError(f"--{option} applies only with --logs")
  if args.worker is not None and args.worker < 0:
    raise JaxformerError(f"--worker {args.worker}: workers are numbered from 0")
  if args.processes is not None and args.worker is not None and args.worker >= args.processes:
    raise JaxformerError(f"--worker {args.worker}: the pod has {args.processes} worker(s), "
                         f"0 to {args.processes - 1}")


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
  _check_detached(args)
  if not command:
    raise JaxformerError("no command to launch; put it after --, e.g. -- jaxformer train "
                         "--config default --workdir runs/default")
  if args.tpu and "--dry-run" in command:
    raise JaxformerError("--dry-run is an option of the launcher: put it before --")


def _action(args: argparse.Namespace) -> str:
  """start (or, for a simulated pod, run in the foreground), status, logs or stop."""
  return next((a for a in ACTIONS[1:] if getattr(args, a)), "start")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv[:1] and argv[0].startswith("_"):  # A helper of a detached worker (worker_main).
      return worker_main(argv)
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _check(args, command)
    action = _action(args)
    if args.tpu:
      return run_on_tpu(command, args.tpu, args.zone, args.project, args.revision, args.dry_run,
                        action, args.worker, args.follow)
    if action != "start":
      return local_pod_action(action, command, args.processes, args.worker, args.follow)
    if args.detach:
      return start_local_pod(command, args.processes, args.devices_per_process or 1)
    return run_local_pod(command, args.processes, args.devices_per_process or 1,
                         args.stop_grace)
  except JaxformerError as e:
    print(f"error: {e}", file=sys.stderr)  # As jaxformer.cli says it (no 'launcher: ' prefix).
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
