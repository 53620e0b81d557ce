"""Detached runs: started, looked at (--status, --logs), stopped (--stop) and resumed.

The worker side (the wrapper, its pid and exit files, the start, status and stop shell lines) is
the same on a TPU VM worker and in a simulated pod, so it is tested here for real: first with a
stand-in trainer (no jax, a second), then as a detached 2-process pod of the tiny model, stopped
and resumed, against an uninterrupted pod. The TPU commands themselves are checked as text.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxformer import errors, launcher
from jaxformer import workdir as workdir_lib
from tests import run_testing
from tests.test_multihost import assert_same_params, saved_params

ROOT = run_testing.REPO
TIMEOUT_S = 120
STOPPED_STATUS = errors.EXIT_STOPPED  # 75: stopped by a signal at a saved step.
STOPPED = "stopped (exit 75; run the same command to resume)"

# Stands in for a trainer: logs three steps, then waits; SIGTERM makes it exit as stopped.
FAKE_TRAINER = f"""
import signal, sys, time
def stop(signum, frame):
  print("stopped by SIGTERM at step 3", flush=True)
  sys.exit({STOPPED_STATUS})
signal.signal(signal.SIGTERM, stop)
for step in range(1, 4):
  print(f"step {{step}}: loss=1.0", flush=True)
time.sleep(60)
"""


def sh(script, env=None):
  return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
                        env=env)


def wait_until(condition, what, timeout_s=TIMEOUT_S):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def read(path):
  with open(path) as f:
    return f.read()


# --- The worker side, with a stand-in trainer. ---------------------------------------------------

def test_a_detached_worker_is_started_seen_stopped_and_its_end_recorded(tmp_path):
  log_dir = str(tmp_path / "logs")
  log = launcher.worker_log(log_dir, 0)
  trainer = [sys.executable, "-c", FAKE_TRAINER]
  start = launcher.start_script(sys.executable, log_dir, None, trainer, "0")
  started = sh(start)
  assert started.returncode == 0, started.stderr
  pid = int(read(f"{log_dir}/worker_0.pid"))
  assert started.stdout == f"worker 0: started (pid {pid}), log {log}\n"
  wait_until(lambda: "step 3:" in read(log), "three logged steps")
  status = sh(launcher.status_script(sys.executable, log_dir, "0"))
  assert status.stdout == f"worker 0: running (pid {pid}), step 3\n"
  # Its own session, no terminal, stdin /dev/null: nothing of the starting shell holds it.
  assert os.getsid(pid) != os.getsid(0)
  assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
  # A second start leaves the running trainer (and its pid file) alone.
  again = sh(start)
  assert again.returncode == 1 and "worker 0: already running" in again.stderr
  assert int(read(f"{log_dir}/worker_0.pid")) == pid

  stop = sh(launcher.stop_script(sys.executable, log_dir, "0"))
  assert stop.stdout == f"worker 0: sent SIGTERM to the trainer (pid {pid})\n"
  wait_until(lambda: os.path.exists(f"{log_dir}/worker_0.exit"), "the exit status")
  assert read(f"{log_dir}/worker_0.exit") == f"{STOPPED_STATUS}\n"
  assert launcher.worker_status(0, log) == f"worker 0: {STOPPED}, step 3"
  assert sh(launcher.stop_script(sys.executable, log_dir, "0")).stdout == (
      "worker 0: not running\n")
  lines = sh(launcher.logs_script(log_dir, 0, follow=False)).stdout.splitlines()
  assert lines[0].startswith("launcher: worker 0 started on ")
  assert lines[0].endswith(shlex.join(trainer).replace("\n", "\\n"))  # One line.
  assert lines[1:] == ["step 1: loss=1.0", "step 2: loss=1.0", "step 3: loss=1.0",
                       "stopped by SIGTERM at step 3",
                       f"launcher: worker 0: the trainer ended with exit status "
                       f"{STOPPED_STATUS} ({STOPPED.split()[0]})"]


def fake_worker_files(log_dir, index, log, pid=None, exit_status=None):
  os.makedirs(log_dir, exist_ok=True)
  path = launcher.worker_log(log_dir, index)
  with open(path, "w") as f:
    f.write(log)
  if pid is not None:
    with open(launcher.sibling(path, ".pid"), "w") as f:
      f.write(f"{pid}\n")
  if exit_status is not None:
    with open(launcher.sibling(path, ".exit"), "w") as f:
      f.write(f"{exit_status}\n")
  return path


def test_status_names_each_exit_status_and_reads_only_the_newest_start(tmp_path):
  header = "launcher: worker {} started on host at 2026-01-01 00:00:00: jaxformer train\n"
  earlier = header.format(0) + "step 9: loss=1\nerror: an error of an earlier start\n"
  cases = {
      0: (earlier + header.format(0) + "step 4: loss=1\n", os.getpid(), None,
          f"running (pid {os.getpid()}), step 4"),
      1: (header.format(1) + "step 6: loss=1\n", 1, 0, "finished (exit 0), step 6"),
      2: (header.format(2) + "step 2: loss=1\njaxformer: stopped by SIGTERM at step 3; the "
          "checkpoint is saved\n", 1, 75, "stopped (exit 75; run the same command to resume), "
          "step 3"),
      3: (earlier.replace("worker 0", "worker 3") + header.format(3)
          + "error: no such experiment: nope\n", 1, 2, "error (exit 2): error: no such "
          "experiment: nope"),
      4: (header.format(4) + "step 8: loss=1\nTraceback (most recent call last):\n"
          "  File x\nRuntimeError: boom\n", 1, 1, "failed (exit 1), step 8: RuntimeError: boom"),
      5: ("", None, None, "not started"),
  }
  log_dir = str(tmp_path)
  for index, (log, pid, status, want) in cases.items():
    path = fake_worker_files(log_dir, index, log, pid, status)
    assert launcher.worker_status(index, path).startswith(f"worker {index}: {want}")
  # A pid file without an exit status whose process is gone: the wrapper was killed too.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  path = fake_worker_files(log_dir, 6, header.format(6), dead)
  assert launcher.worker_status(6, path).startswith("worker 6: failed (no exit status")
  # A live pid that started long after its pid file was written is another process (the
  # machine restarted and reused the number): not the trainer, and never signalled.
  path = fake_worker_files(log_dir, 7, header.format(7), os.getpid())
  long_ago = time.time() - 10 * 24 * 3600
  os.utime(launcher.sibling(path, ".pid"), (long_ago, long_ago))
  assert launcher.trainer_pid(path) is None
  assert sh(launcher.stop_script(sys.executable, log_dir, "7")).stdout == (
      "worker 7: not running\n")


def test_the_worker_index_comes_from_tpu_worker_id_and_a_bad_one_is_refused(tmp_path):
  log_dir = str(tmp_path)
  fake_worker_files(log_dir, 3, "", 1, 0)
  script = launcher.status_script(sys.executable, log_dir, launcher.TPU_WORKER_INDEX)
  got = sh(script, env=dict(os.environ, TPU_WORKER_ID="3"))
  assert got.stdout == "worker 3: finished (exit 0)\n", got.stderr
  bad = sh(script, env=dict(os.environ, TPU_WORKER_ID="three"))
  assert bad.returncode == 1 and "no index for this worker" in bad.stderr


FAKE_GCLOUD = """#!/bin/sh
# `gcloud storage cp --quiet FILE... gs://DIR/`, onto a local directory; each call noted.
[ "$1 $2 $3" = "storage cp --quiet" ] || exit 9
shift 3
for last; do :; done
dest="$FAKE_GCS/${last#gs://}"
mkdir -p "$dest"
while [ $# -gt 1 ]; do cp "$1" "$dest"; echo "$1" >> "$FAKE_GCS/calls"; shift; done
"""


def test_the_log_of_a_gs_workdir_is_copied_while_the_run_goes_on_and_at_its_end(tmp_path):
  bin_dir, gcs = tmp_path / "bin", tmp_path / "gcs"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log_dir, copy_to = launcher.log_places("gs://bucket/run/", str(tmp_path / "local"))
  assert (log_dir, copy_to) == (str(tmp_path / "local" / "bucket" / "run"), "gs://bucket/run/logs")
  os.makedirs(log_dir)
  log = launcher.worker_log(log_dir, 0)
  trainer = "import time; print('step 1: a', flush=True); time.sleep(1.5); print('step 2: b')"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCS=str(gcs),
             PYTHONPATH=ROOT)
  result = sh(f"{sys.executable} -m jaxformer.launcher _worker --worker 0 --log {log} "
              f"--copy-to {copy_to} --copy-every 0.3 -- {sys.executable} -c {shlex.quote(trainer)}"
              f" >> {log} 2>&1", env=env)
  assert result.returncode == 0, read(log)
  copied = gcs / "bucket" / "run" / "logs"
  assert read(copied / "worker_0.log") == read(log) and "step 2: b" in read(log)
  assert read(copied / "worker_0.exit") == "0\n"
  calls = read(gcs / "calls").splitlines()
  assert calls.count(log) >= 2, calls  # While it ran (only when changed), and at the end.


# --- A detached pod of the tiny model. -----------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


# Steps that never end by themselves (the test stops them), every step logged, one checkpoint:
# the one the stop asks for.
LONG = {"data.packing": False, "train.steps": 100_000, "train.log_every_steps": 1,
        "train.eval_every_steps": 100_000, "checkpoint.every_steps": 100_000,
        "eval.bleu_examples": 8, "eval.num_samples": 0, "decode.beam_size": 1}


def launch(runs, workdir, *flags, **overrides):
  """`python -m jaxformer.launcher --processes 2 FLAGS -- python -m jaxformer train ...`."""
  command = [sys.executable, "-m", "jaxformer.launcher", "--processes", "2", *flags, "--",
             sys.executable, "-m", "jaxformer",
             *runs.train_args(workdir, **{**LONG, **overrides})]
  return subprocess.run(command, cwd=ROOT, env=runs.env(1), capture_output=True, text=True,
                        timeout=run_testing.RUN_TIMEOUT_S)


def status_lines(runs, workdir, **overrides):
  result = launch(runs, workdir, "--status", **overrides)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def ended(workdir):
  logs = os.path.join(workdir, workdir_lib.LOGS_DIR)
  return all(os.path.exists(os.path.join(logs, f"worker_{i}.exit")) for i in range(2))


def logged_steps(workdir):
  return [int(m.group(1)) for m in re.finditer(
      r"^step (\d+):", read(os.path.join(workdir, "logs", "worker_0.log")), re.M)]


class Follower:
  """`--logs --follow`, its output read as it comes; ended (with its tail) by `close`."""

  def __init__(self, runs, workdir):
    command = [sys.executable, "-m", "jaxformer.launcher", "--processes", "2", "--logs",
               "--follow", "--", sys.executable, "-m", "jaxformer",
               *runs.train_args(workdir, **LONG)]
    self.process = subprocess.Popen(command, cwd=ROOT, env=runs.env(1), stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
    self.lines = []
    threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

  def close(self):
    os.killpg(self.process.pid, signal.SIGTERM)
    self.process.wait(timeout=TIMEOUT_S)


@pytest.mark.slow
def test_detached_pod_is_stopped_at_one_step_and_resumes_to_the_uninterrupted_parameters(
    runs, tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "detached"))
  started = launch(runs, workdir, "--detach")
  assert started.returncode == 0, started.stderr
  assert [line.split(" (pid ")[0] for line in started.stdout.splitlines()] == [
      "worker 0: started", "worker 1: started"]
  # The launcher has returned; the pod trains on.
  assert [line.split(" (pid ")[0] for line in status_lines(runs, workdir)] == [
      "worker 0: running", "worker 1: running"]
  run_testing.wait_for(lambda: len(logged_steps(workdir)) >= 2, "two logged steps",
                       timeout_s=TIMEOUT_S)
  worker_1 = launch(runs, workdir, "--logs", "--worker", "1").stdout
  assert worker_1.startswith("launcher: worker 1 started on ")
  assert "step 1:" in launch(runs, workdir, "--logs").stdout

  stop = launch(runs, workdir, "--stop")
  assert [line.split(" (pid ")[0] for line in stop.stdout.splitlines()] == [
      "worker 0: sent SIGTERM to the trainer", "worker 1: sent SIGTERM to the trainer"]
  run_testing.wait_for(lambda: ended(workdir), "both workers to end", timeout_s=TIMEOUT_S)
  # Both saved the same step: one checkpoint, with both processes' data positions.
  [step] = run_testing.checkpoint_steps(workdir)
  data = os.listdir(os.path.join(workdir, "checkpoints", str(step), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data), data
  assert logged_steps(workdir)[-1] == step  # The stop step was trained, logged and saved.
  assert status_lines(runs, workdir) == [f"worker 0: {STOPPED}, step {step}",
                                         f"worker 1: {STOPPED}"]

  # The same command resumes (here with two more steps to go), followed as it writes.
  follower = Follower(runs, workdir)
  resumed = launch(runs, workdir, "--detach", train__steps=step + 2)
  assert resumed.returncode == 0, resumed.stderr
  run_testing.wait_for(lambda: ended(workdir), "the resumed run to end", timeout_s=TIMEOUT_S)
  assert status_lines(runs, workdir) == [f"worker 0: finished (exit 0), step {step + 2}",
                                         "worker 1: finished (exit 0)"]
  run_testing.wait_for(lambda: any("exit status 0 (finished)" in line for line in follower.lines),
                       "the followed log to show the end", timeout_s=30)
  follower.close()
  assert any(line.startswith(f"step {step + 2}:") for line in follower.lines)

  uninterrupted = runs.new_workdir(str(tmp_path / "uninterrupted"))
  foreground = launch(runs, uninterrupted, train__steps=step + 2)
  assert foreground.returncode == 0, foreground.stderr[-3000:]
  assert_same_params(saved_params(workdir, step + 2), saved_params(uninterrupted, step + 2))


# --- The TPU commands, as text. ------------------------------------------------------------------

def tpu_dry_run(*flags):
  result = subprocess.run(
      ["bash", "launch.sh", "default", "--tpu", "my-pod", "--zone", "us-central2-b",
       "--workdir", "gs://my-bucket/run", "--dry-run", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_dry_run_prints_the_detached_start_status_logs_and_stop():
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--worker=all", "--zone",
         "us-central2-b", "--command"]
  log = "logs/my-bucket/run/worker_$I"  # On each worker's disk, under ~/jaxformer.
  start = tpu_dry_run()[-1]
  assert start[:-1] == ssh
  remote = start[-1]
  assert remote.startswith("cd ~/jaxformer || exit 1; I=${TPU_WORKER_ID:-$(curl ")
  assert "instance/attributes/agent-worker-number" in remote
  assert f"W={log};" in remote and 'rm -f "$W.pid" "$W.exit"' in remote  # pid and exit files
  assert re.search(r"JAXFORMER_DISTRIBUTED=auto PYTHONUNBUFFERED=1 setsid nohup "
                   r"\.venv/bin/python -m jaxformer\.launcher _worker --worker \"\$I\" --log "
                   r"\"\$W\.log\" --copy-to gs://my-bucket/run/logs -- \.venv/bin/python -m "
                   r"jaxformer train --config default --workdir gs://my-bucket/run "
                   r"< /dev/null >> \"\$W\.log\" 2>&1 & ", remote), remote
  assert remote.endswith('_started --worker "$I" --wrapper $! --log "$W.log"')
  [status] = tpu_dry_run("--status")
  assert status[:-1] == ssh and status[-1].endswith(
      '.venv/bin/python -m jaxformer.launcher _status --worker "$I" --log "$W.log"')
  [stop] = tpu_dry_run("--stop")
  assert stop[:-1] == ssh and 'kill -TERM "$(cat "$W.pid")"' in stop[-1]
  [logs] = tpu_dry_run("--logs", "--worker", "3", "--follow")
  assert logs[:-1] == [*ssh[:6], "--worker=3", *ssh[7:]]
  assert logs[-1].endswith("exec tail -n +1 -f logs/my-bucket/run/worker_3.log")
  assert tpu_dry_run("--logs")[0][-1].endswith("exec tail -n +1 logs/my-bucket/run/worker_0.log")


def test_tpu_status_lines_come_back_in_worker_order():
  arrived = "worker 10: running\nworker 2: finished (exit 0)\nsome gcloud line\nworker 0: running\n"
  assert launcher._by_worker(arrived).splitlines() == [
      "worker 0: running", "worker 2: finished (exit 0)", "worker 10: running", "some gcloud line"]


def test_tpu_run_on_a_mounted_workdir_logs_into_it():
  [status] = launcher.tpu_action_commands("status", ["train", "--workdir", "/mnt/nfs/run"],
                                          "pod", "zone-a", None)
  assert "W=/mnt/nfs/run/logs/worker_$I;" in status[-1]


# --- The command line. ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--status", "--", "jaxformer", "train", "--workdir", "w"], "say --processes N"),
    (["--processes", "2", "--status", "--", "jaxformer", "train"], "--status needs the run's "
     "--workdir"),
    (["--processes", "2", "--logs", "--worker", "5", "--", "jaxformer", "train", "--workdir",
      "w"], "--worker 5: the pod has 2 worker(s), 0 to 1"),
    (["--processes", "2", "--logs", "--worker", "-1", "--", "ls"], "numbered from 0"),
    (["--processes", "2", "--status", "--worker", "1", "--", "ls"], "--worker applies only"),
    (["--processes", "2", "--follow", "--", "ls"], "--follow applies only with --logs"),
    (["--processes", "2", "--status", "--stop", "--", "ls"], "choose one of --status, --stop"),
    (["--processes", "2", "--detach", "--", "jaxformer", "train", "--workdir", "gs://b/r"],
     "use a local --workdir"),
    (["--tpu", "pod", "--zone", "z", "--status", "--", "jaxformer", "train"],
     "--tpu needs the run's --workdir"),
    (["_status"], "the following arguments are required: --log"),
])
def test_detached_run_errors_are_one_line_and_exit_2(args, message, capsys):
  assert launcher.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_the_launcher_loads_no_jax_and_names_the_workdirs_logs_folder():
  assert launcher.LOGS_DIR == workdir_lib.LOGS_DIR
  code = "import sys, jaxformer.launcher; print('jax' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.stdout.strip() == "False", result.stderr
