"""A simulated pod: local processes joined by jax.distributed train exactly like one process.

The pods are real: `python -m jaxformer.launcher --processes 2 --devices-per-process 2` starts
two `jaxformer train` processes, joined through a coordinator on 127.0.0.1. Their expectations
come from elsewhere: the same steps run here, in the test's own single process on 4 of its CPU
devices. The pods share one prepared dataset and a compilation cache, so only the first one of
each strategy compiles.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from jaxformer import config as config_lib, devices, inference, launcher
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.errors import JaxformerError
from jaxformer.train import parallel, writer as writer_lib

from tests import run_testing
from tests.train.train_testing import relative_errors, worst_relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, DEVICES_PER_PROCESS = 2, 2
STEPS = 6
TOLERANCE = 1e-5   # relative, per parameter array: ||a - b|| / ||b|| (train_testing)
POD_TIMEOUT_S = 400
OVERRIDES = {
    "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.d_ff": 64,
    "model.vocab_size": 64,
    # The gradient of the attention key bias is rounding noise (see tests/train/test_parallel.py),
    # which Adam turns into full-size steps; without that bias every parameter has one answer.
    "model.attention_bias": False,
    "data.num_train": 2000, "data.num_validation": 64, "data.num_test": 64, "data.max_len": 24,
    # One pair per row, none dropped: the global batches of any process count are then the
    # same rows (with packing each process packs its own pairs).
    "data.packing": False, "data.length_policy": "truncate",
    "train.batch_size": 8, "train.steps": STEPS, "train.warmup_steps": 4,
    "train.log_every_steps": 2, "train.peak_flops": 1e12,
    "eval.batch_size": 8, "eval.bleu_examples": 8, "eval.num_samples": 0, "decode.beam_size": 1,
    "checkpoint.every_steps": 2,
}  # Dropout stays on (0.1): equal parameters mean equal rows in equal places.


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Paths every pod of this module shares: the dataset and the compilation cache."""
  root = tmp_path_factory.mktemp("pod")
  return {"data_dir": str(root / "tfds"), "cache": str(root / "jax_cache")}


def overrides(shared, strategy):
  return {**OVERRIDES, "data.data_dir": shared["data_dir"], "parallel.strategy": strategy}


def run_config(shared, strategy):
  return config_lib.load_config("default", {k: str(v) for k, v in
                                            overrides(shared, strategy).items()})


def pod_command(shared, strategy, workdir):
  return [sys.executable, "-m", "jaxformer.launcher", "--processes", str(PROCESSES),
          "--devices-per-process", str(DEVICES_PER_PROCESS), "--",
          sys.executable, "-m", "jaxformer", "train", "--config", "default",
          "--workdir", str(workdir),
          *(f"--config.{k}={v}" for k, v in overrides(shared, strategy).items())]


def pod_env(shared):
  """The pods compile into (and read from) one persistent cache: only the first one compiles."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=shared["cache"],
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_pod(shared, strategy, workdir) -> str:
  """Trains on a simulated pod into `workdir`; returns the output of all processes."""
  result = subprocess.run(pod_command(shared, strategy, workdir), cwd=ROOT, env=pod_env(shared),
                          capture_output=True, text=True, timeout=POD_TIMEOUT_S)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-5000:]
  return output


def saved_params(workdir, step=STEPS):
  """The parameters of a pod's checkpoint, as numpy arrays."""
  params, _, _ = inference.load_params(str(workdir), step=step)
  return jax.tree.map(np.asarray, params)


def one_process_params(config, workdir):
  """(initial, final) parameters of STEPS steps of the training loop in this process on 4
  devices: init, then for each step the next batch of the one-process pipeline, placed and
  trained by the same strategy."""
  tokenizer = Tokenizer.load(os.path.join(workdir, "vocab.model"))  # the pod's vocabulary
  strategy = parallel.make_strategy(config, jax.devices()[:PROCESSES * DEVICES_PER_PROCESS])
  batches = pipeline.make_train_iterator(config, tokenizer, config.data.data_dir,
                                         process_index=0, process_count=1)
  state = strategy.init_state(jax.random.key(config.train.seed))
  initial = jax.tree.map(np.asarray, strategy.state_to_host(state).params)
  for _ in range(STEPS):
    state, _ = strategy.train_step(state, strategy.shard_batch(next(batches)))
  return initial, jax.tree.map(np.asarray, strategy.state_to_host(state).params)


def assert_same_params(got, want):
  """Every parameter array within TOLERANCE of its counterpart, relative to its own size (an
  absolute bound would let the small arrays, biases that start at 0, differ by any share)."""
  path, error = worst_relative_error(got, want)
  assert error <= TOLERANCE, f"{path} differs by {error:.3g} (relative)"


@pytest.fixture(scope="module")
def pods(shared, tmp_path_factory):
  """Uninterrupted 2 x 2 runs, one per strategy, trained on first use: {strategy: (workdir,
  output)}."""
  runs = {}

  def get(strategy):
    if strategy not in runs:
      workdir = tmp_path_factory.mktemp(f"uninterrupted_{strategy}")
      runs[strategy] = workdir, run_pod(shared, strategy, workdir)
    return runs[strategy]
  return get


# --- Two processes x two devices train like one process x four. ---------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mesh", "pmap"])
def test_pod_of_two_processes_ends_with_the_parameters_of_one_process(strategy, pods, shared):
  workdir, output = pods(strategy)
  initial, final = one_process_params(run_config(shared, strategy), str(workdir))
  moved = relative_errors(initial, final)   # each array, so that no comparison is vacuous
  least = min(moved, key=moved.get)
  assert moved[least] > 100 * TOLERANCE, f"training hardly moved {least}"
  assert_same_params(saved_params(workdir), final)

  # Device and process counts are logged once, by process 0.
  assert output.count("jaxformer: 2 process(es), 4 device(s)") == 1
  assert "[0] jaxformer: 2 process(es), 4 device(s)" in output
  # Only process 0 writes metrics and event files: each record once, one event file.
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  keys = [(r["step"], r["split"]) for r in records]
  assert sorted(keys) == sorted(set(keys))
  assert {(step, "train") for step in range(2, STEPS + 1, 2)} <= set(keys)
  assert (STEPS, "validation") in keys
  assert len(os.listdir(workdir / "tensorboard")) == 1
  # Every process saved its own data iterator beside the state.
  data_files = os.listdir(workdir / "checkpoints" / str(STEPS) / "data")
  assert sorted(f for f in data_files if f.startswith("process_")) == [
      f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]


# --- Killed and resumed. -------------------------------------------------------------------------

def finished_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def children_of(pid):
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(child) for child in f.read().split()]


def is_running(pid):
  """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_pod_resumes_from_its_checkpoint_and_matches_the_uninterrupted_run(
    pods, shared, tmp_path):
  uninterrupted, _ = pods("mesh")  # Also compiles everything this test runs.
  workdir = tmp_path / "killed"
  with open(tmp_path / "killed.log", "w") as log:
    pod = subprocess.Popen(pod_command(shared, "mesh", workdir), cwd=ROOT, env=pod_env(shared),
                           stdout=log, stderr=subprocess.STDOUT)
    # SIGKILL the launcher as soon as the first checkpoint is complete (the evaluation at the
    # last step comes later, so the run is still training or evaluating then).
    deadline = time.monotonic() + POD_TIMEOUT_S
    while not finished_steps(workdir) and pod.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    running = pod.poll() is None
    processes = children_of(pod.pid) if running else []
    pod.send_signal(signal.SIGKILL)
    pod.wait()
  assert running and len(processes) == PROCESSES, open(tmp_path / "killed.log").read()[-3000:]
  # The launcher's processes die with it (none is left to write into the workdir).
  deadline = time.monotonic() + 30
  while any(map(is_running, processes)) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(map(is_running, processes))
  killed_at = finished_steps(workdir)
  assert killed_at and killed_at[-1] < STEPS, (
      f"the run was not killed between its first checkpoint and its end: {killed_at}\n"
      + open(tmp_path / "killed.log").read()[-3000:])

  output = run_pod(shared, "mesh", workdir)
  assert f"resumed from the checkpoint at step {killed_at[-1]}" in output
  # Each process restored its own iterator state, so the resumed steps read the batches the
  # uninterrupted run read: the same parameters at the end.
  assert_same_params(saved_params(workdir), saved_params(uninterrupted))


# --- One process fails: the launcher stops the other. --------------------------------------------

FAILING_POD = """
import os, pathlib, signal, sys, time
ready = pathlib.Path(sys.argv[1])
if os.environ["JAXFORMER_PROCESS_ID"] == "0":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Like a process stuck in a collective.
  ready.touch()
  time.sleep(300)
  print("process 0 finished")
else:
  while not ready.exists():
    time.sleep(0.05)
  open(sys.argv[2])  # A path only process 1 gets wrong.
"""


def test_one_failing_process_stops_the_pod_with_its_error(tmp_path):
  bad_path = str(tmp_path / "missing" / "vocab.model")
  command = [sys.executable, "-m", "jaxformer.launcher", "--processes", "2", "--stop-grace", "1",
             "--", sys.executable, "-c", FAILING_POD, str(tmp_path / "ready"), bad_path]
  # The timeout is the bound: process 0 alone would run for 300 s.
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert f"[1] FileNotFoundError: [Errno 2] No such file or directory: '{bad_path}'" in (
      result.stdout)
  assert "launcher: process 1 exited with status 1; stopping the others" in result.stderr
  assert "process 0 finished" not in result.stdout
  # At the end, how each process ended, in the words of --status.
  assert "launcher: process 1: failed (exit 1)" in result.stderr
  assert re.search(r"launcher: process 0: \w+ \(exit \d+", result.stderr), result.stderr


# --- The launcher's command line. ----------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--tpu", "pod", "--", "jaxformer", "train"], "--tpu needs --zone"),
    (["--processes", "2"], "no command to launch"),
    (["--zone", "us-central2-b", "--", "jaxformer"], "--zone applies only with --tpu"),
    (["--", "jaxformer", "train"], "say --processes N"),
    (["--processes", "2", "--tpu", "pod", "--zone", "z", "--", "ls"], "not both"),
    (["--processes", "0", "--", "ls"], "must be at least 1"),
    (["--tpu", "pod", "--zone", "z", "--", "ls"], "runs a jaxformer command"),
    (["--tpu", "pod", "--zone", "z", "--", "jaxformer", "train", "--dry-run"],
     "put it before --"),
    (["--processes", "two", "--", "ls"], "invalid int value"),
])
def test_launcher_errors_are_one_line_and_exit_2(args, message, capsys):
  assert launcher.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_launcher_module_exits_2_with_one_line():
  result = subprocess.run([sys.executable, "-m", "jaxformer.launcher", "--tpu", "pod", "--",
                           "jaxformer", "train"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "error: --tpu needs --zone (the TPU VM's zone, e.g. us-central2-b)"]


def test_launch_sh_tpu_dry_run_prints_the_gcloud_commands():
  result = subprocess.run(
      ["bash", "launch.sh", "wmt14_en_de_base_tpu32", "--tpu", "my-pod", "--zone",
       "us-central2-b", "--project", "my-project", "--workdir", "gs://my-bucket/base",
       "--config.train.steps=10", "--dry-run"],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  where = ["--worker=all", "--zone", "us-central2-b", "--project", "my-project"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", *where, "--command"]
  archive = "/tmp/jaxformer-my-pod.tar.gz"
  assert lines[0] == ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", archive, "HEAD"]
  assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                      "my-pod:jaxformer.tar.gz", *where]
  assert lines[2] == [*ssh, "mkdir -p ~/jaxformer && tar xzf jaxformer.tar.gz -C ~/jaxformer"]
  assert lines[3][:-1] == ssh and "pip install" in lines[3][-1] and ".[tpu]" in lines[3][-1]
  assert lines[4][:-1] == ssh and len(lines) == 5
  # The trainer starts detached on every worker (tests/test_launcher.py checks the rest).
  assert ("JAXFORMER_DISTRIBUTED=auto PYTHONUNBUFFERED=1 setsid nohup .venv/bin/python -m "
          "jaxformer.launcher _worker") in lines[4][-1]
  assert ("-- .venv/bin/python -m jaxformer train --config wmt14_en_de_base_tpu32 --workdir "
          "gs://my-bucket/base --config.train.steps=10 < /dev/null") in lines[4][-1]
  assert not os.path.exists(archive) or os.path.getmtime(archive) < time.time() - 60, (
      "--dry-run ran a command")


# --- Shared storage and the pod experiment. ------------------------------------------------------

@pytest.mark.parametrize("appendable", [True, False])  # False: as on gs://, rewritten whole.
def test_metrics_file_keeps_every_record_where_files_cannot_be_appended(
    appendable, tmp_path, monkeypatch):
  monkeypatch.setattr(writer_lib, "can_append", lambda path: appendable)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')  # a resumed run
  metrics = writer_lib.MetricsWriter(str(tmp_path), enabled=True)
  metrics.write(2, "train", {"loss": 1.5})
  metrics.write(2, "validation", {"bleu": 3.0})
  metrics.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert records == [{"step": 1, "split": "train"}, {"step": 2, "split": "train", "loss": 1.5},
                     {"step": 2, "split": "validation", "bleu": 3.0}]


def test_tpu32_experiment_is_the_papers_base_model_and_batch_on_32_chips():
  base = config_lib.load_config("wmt14_en_de_base")
  config = config_lib.load_config("wmt14_en_de_base_tpu32")
  assert all(config_lib.get_key(config, key) == config_lib.get_key(base, key)
             for key in workdir_lib.MODEL_SHAPE_KEYS + workdir_lib.TOKENIZER_KEYS)
  assert config.model.dtype == "bfloat16"
  # About 25k source and 25k target token slots per step, as in the paper.
  assert 0.9 * 25_000 <= config.train.batch_size * config.data.max_len <= 1.1 * 25_000
  # Fits 32 chips, on 8 hosts of 4 or 4 hosts of 8.
  for chips_per_host in (4, 8):
    chips = [types.SimpleNamespace(process_index=i // chips_per_host) for i in range(32)]
    devices.validate_for_devices(config, chips)


def test_tpu_revision_checks_out_the_same_commit_on_every_worker(tmp_path):
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin",
                  "https://example.com/me/jaxformer.git"], check=True)
  steps = launcher.tpu_commands(["train", "--workdir", "gs://b/r"], "pod", "zone-a", None,
                                "v1.2", str(tmp_path))
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all", "--zone", "zone-a",
         "--command"]
  assert [step[:-1] for step in steps] == [ssh, ssh, ssh]
  assert steps[0][-1] == ("test -d ~/jaxformer || git clone https://example.com/me/jaxformer.git "
                          "~/jaxformer; cd ~/jaxformer && git fetch --all && git checkout v1.2")
  assert "-m jaxformer train --workdir gs://b/r < /dev/null" in steps[2][-1]
  # Without a remote the workers could not clone: one clear error.
  subprocess.run(["git", "-C", str(tmp_path), "remote", "remove", "origin"], check=True)
  with pytest.raises(JaxformerError, match="--revision needs a git remote 'origin'"):
    launcher.tpu_commands(["train"], "pod", "zone-a", None, "v1.2", str(tmp_path))


# --- Using a trained run on a pod. ------------------------------------------------------------

# `python -c` code that runs two jaxformer commands, split at '--then', in one process: a pod
# joins once and restores the run once for both, which keeps the suite within its budget.
TWO_COMMANDS = ("import sys; from jaxformer import cli; i = sys.argv.index('--then'); "
                "sys.exit(cli.main(sys.argv[1:i]) or cli.main(sys.argv[i + 1:]))")


def test_pod_evaluates_and_translates_as_one_process_does(tmp_path_factory, tmp_path):
  """evaluate: one result from process 0, the whole split counted once; translate: process 0
  reads the file and writes the output in input order, every process decodes."""
  runs = run_testing.session_runs(tmp_path_factory)
  workdir = run_testing.copy_workdir(runs.reference(), str(tmp_path / "run"))
  source = tmp_path / "in37.txt"  # 37 lines: 2 chunks of 16 and one of 5, empty lines among them.
  source.write_text("".join(f"{'' if i % 6 == 5 else str(i * 37)}\n" for i in range(37)),
                    encoding="utf-8")

  def commands(name):
    return ["evaluate", "--workdir", workdir, "--split", "validation", "--hypotheses",
            str(tmp_path / f"{name}.hyp"), "--then", "translate", "--workdir", workdir,
            "--input", str(source), "--output", str(tmp_path / f"{name}.out"),
            "--batch-size", "16"]

  alone = runs.python(TWO_COMMANDS, commands("alone"), devices=1)
  assert alone.returncode == 0, alone.stderr[-3000:]
  pod = subprocess.run(
      [sys.executable, "-m", "jaxformer.launcher", "--processes", str(PROCESSES),
       "--devices-per-process", str(DEVICES_PER_PROCESS), "--", sys.executable, "-c",
       TWO_COMMANDS, *commands("pod")], cwd=ROOT, env=runs.env(1), capture_output=True,
      text=True, timeout=POD_TIMEOUT_S)
  assert pod.returncode == 0, (pod.stdout + pod.stderr)[-5000:]
  results = [line for line in pod.stdout.splitlines() if line.lstrip("[0123456789] ")[:1] == "{"]
  assert len(results) == 1 and results[0].startswith("[0] "), pod.stdout[-3000:]
  want, got = json.loads(alone.stdout), json.loads(results[0].removeprefix("[0] "))
  for key in ("num_tokens", "decoded_examples", "exact_match", "bleu", "bleu_signature", "chrf"):
    assert got[key] == want[key], key
  for key in ("loss", "accuracy"):
    assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), key
  assert want["decoded_examples"] == 64  # data.num_validation: every example, once.
  for kind, lines in (("hyp", 64), ("out", 37)):  # One line each, in order, as one process.
    pod_lines = (tmp_path / f"pod.{kind}").read_text(encoding="utf-8").split("\n")
    assert pod_lines == (tmp_path / f"alone.{kind}").read_text(encoding="utf-8").split("\n")
    assert len(pod_lines) == lines + 1
