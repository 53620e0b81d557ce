"""Starting one jaxformer command on many processes: a simulated pod, or every TPU VM worker.

    python -m jaxformer.launcher --processes N [--devices-per-process M] -- jaxformer ARGS...
    python -m jaxformer.launcher --tpu NAME --zone ZONE [--project P] [--revision REV]
                                 [--dry-run] -- jaxformer ARGS...

A simulated pod runs N local processes with M CPU devices each, joined by jax.distributed
through a coordinator on 127.0.0.1 at a free port: exactly what a TPU pod's hosts do, on one
machine. Each process learns its place from three environment variables, which are also how
one process per host is started on a GPU cluster by hand or by a scheduler:

    JAXFORMER_COORDINATOR_ADDRESS=host:port  JAXFORMER_NUM_PROCESSES=N  JAXFORMER_PROCESS_ID=i

(`jaxformer/train/parallel.py: initialize_distributed` reads them.) Output lines are prefixed
with the process id; if any process fails, the others are stopped and the launcher exits with
the failing status.

On a TPU VM pod the command runs on every worker through `gcloud compute tpus tpu-vm ssh
--worker=all`; JAX finds its peers by itself there (JAXFORMER_DISTRIBUTED=auto).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxformer.errors import JaxformerError

STOP_GRACE_SECONDS = 10  # after a failure, how long the other processes get to stop on SIGTERM.
REMOTE_DIR = "~/jaxformer"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(process: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in iter(process.stdout.readline, ""):
    with lock:
      sys.stdout.write(f"{prefix}{line}")
      sys.stdout.flush()


def run_local_pod(command: list[str], processes: int, devices_per_process: int) -> int:
  """Runs `command` as `processes` local processes of one jax.distributed job."""
  if processes < 1 or devices_per_process < 1:
    raise JaxformerError("--processes and --devices-per-process must be at least 1")
  address = f"127.0.0.1:{free_port()}"
  lock = threading.Lock()
  children, pumps = [], []
  for i in range(processes):
    env = dict(os.environ,
               JAXFORMER_COORDINATOR_ADDRESS=address,
               JAXFORMER_NUM_PROCESSES=str(processes),
               JAXFORMER_PROCESS_ID=str(i),
               JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    children.append(child)
    pump = threading.Thread(target=_pump, args=(child, f"[{i}] ", lock), daemon=True)
    pump.start()
    pumps.append(pump)

  status = 0
  try:
    running = set(range(processes))
    while running:
      for i in sorted(running):
        code = children[i].poll()
        if code is None:
          continue
        running.discard(i)
        if code != 0 and status == 0:
          status = code if code > 0 else 1
          with lock:
            print(f"launcher: process {i} exited with status {code}; stopping the others",
                  file=sys.stderr, flush=True)
          _stop(children)
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(children)
    status = 130
  for pump in pumps:
    pump.join(timeout=STOP_GRACE_SECONDS)
  return status


def _stop(children: list[subprocess.Popen]) -> None:
  """SIGTERM to every running child (they checkpoint and stop), SIGKILL after a grace period."""
  for child in children:
    if child.poll() is None:
      os.killpg(child.pid, signal.SIGTERM)
  deadline = time.monotonic() + STOP_GRACE_SECONDS
  for child in children:
    try:
      child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(child.pid, signal.SIGKILL)
      child.wait()


def tpu_commands(command: list[str], name: str, zone: str, project: str | None,
                 revision: str | None, source_dir: str) -> list[list[str]]:
  """The commands that copy the code to every worker of TPU VM `name`, set it up, and run."""
  where = ["--zone", zone] + (["--project", project] if project else [])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all", *where]
  if revision:
    # Every worker checks out the same revision of the same repository.
    remote = subprocess.run(["git", "-C", source_dir, "remote", "get-url", "origin"],
                            capture_output=True, text=True).stdout.strip()
    if not remote:
      raise JaxformerError("--revision needs a git remote 'origin' that the TPU workers can "
                           "clone; push the repository first or leave --revision out to copy")
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
  setup = [*ssh, "--command",
           f"cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"]
  run = [*ssh, "--command",
         f"cd {REMOTE_DIR} && JAXFORMER_DISTRIBUTED=auto .venv/bin/python -m "
         + " ".join(shlex.quote(c) for c in command)]
  return [*fetch, setup, run]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="launcher", description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=0)
  parser.add_argument("--devices-per-process", type=int, default=1)
  parser.add_argument("--tpu", default=None, help="TPU VM name")
  parser.add_argument("--zone", default=None)
  parser.add_argument("--project", default=None)
  parser.add_argument("--revision", default=None, help="git revision the workers check out")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    if not command:
      raise JaxformerError("no command to launch; put it after --")
    if args.tpu:
      if not args.zone:
        raise JaxformerError("--tpu needs --zone (the TPU VM's zone, e.g. us-central2-b)")
      source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      jaxformer_args = command[command.index("jaxformer") + 1:] if "jaxformer" in command else command
      steps = tpu_commands(["jaxformer", *jaxformer_args], args.tpu, args.zone, args.project,
                           args.revision, source)
      for step in steps:
        print(shlex.join(step), flush=True)
        if not args.dry_run:
          code = subprocess.run(step).returncode
          if code:
            return code
      return 0
    if args.processes:
      return run_local_pod(command, args.processes, args.devices_per_process)
    raise JaxformerError("say --processes N (a simulated pod) or --tpu NAME --zone ZONE")
  except JaxformerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
