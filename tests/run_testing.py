"""Runs of the `jaxformer` command in subprocesses, as a user runs it, on a tiny model.

(A plain module, not conftest.py, so that tests import it by a name no other test uses.)

Each run is `python -m jaxformer ...` with its own simulated device count (XLA_FLAGS), so a
test can train on 8 devices and restore on 1. To keep the suite fast:
- every run trains the default experiment shrunk by TINY (one layer, d_model 32, 2000 pairs);
- the data (tfds) and the vocabulary are built once per session in the pytest process and
  shared: `data.data_dir` points at them and `vocab.model` is copied into each new workdir;
- the runs share a persistent JAX compilation cache, so only the first run of each device
  layout compiles (a cached program is the same program: results do not change), and compile
  with FAST_COMPILE_FLAGS;
- one reference run (REFERENCE_STEPS steps on one device) is trained once per session and
  copied by the tests that need a trained workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, tokenizer as tokenizer_lib, vocab
from jaxformer.train import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "default"
# The default experiment, small enough that a run takes seconds on a CPU.
TINY = {
    "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.d_ff": 64,
    "model.vocab_size": 64, "data.num_train": 2000, "data.num_validation": 64,
    "data.num_test": 64, "data.max_len": 24, "train.batch_size": 8, "eval.batch_size": 8,
    "eval.bleu_examples": 16,
    # No sample translations, so no attention image, at each evaluation: a second or two of CPU
    # a run. The tests of samples and images ask for them.
    "eval.num_samples": 0,
    # Fast learning for a 40-step run, whatever the default experiment's own schedule is.
    "train.learning_rate": 2.0, "train.warmup_steps": 200, "train.grad_clip_norm": 0.0,
    "train.peak_flops": 1e10,  # Any value: MFU is reported, and measuring the peak takes time.
}
# The reference run: 2 * HALF steps, logged every 10, evaluated at HALF and at the end,
# checkpoints every 10 steps (the experiment keeps the newest 3).
HALF = 20
REFERENCE_STEPS = 2 * HALF
REFERENCE = {"train.steps": REFERENCE_STEPS, "train.log_every_steps": 10,
             "train.eval_every_steps": HALF, "checkpoint.every_steps": 10}
RUN_TIMEOUT_S = 600
# A model that decodes to the length limit: trained 2 steps, it hardly ever says EOS, and each
# sentence may run to 256 tokens; 256 validation sentences make 32 batches of beam search, a
# second or so each on a CPU (what a test needs to send a signal in the middle of decoding).
# The run's own evaluation decodes one batch; raise eval.bleu_examples to decode them all.
SLOW_DECODING = {"model.max_len": 256, "decode.max_extra_len": 250, "data.num_validation": 256,
                 "eval.bleu_examples": 8, "train.steps": 2, "train.log_every_steps": 1,
                 "train.eval_every_steps": 1000, "checkpoint.every_steps": 1000}
# The compiler's backend (LLVM) optimizations off: a third less compile time, and these tests
# compare runs with each other (all compiled alike), not speed.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


class Runs:
  """Where the shared pieces of a session live, and how to run the command."""

  def __init__(self, root: str):
    self.root = root
    self.data_dir = os.path.join(root, "tfds")
    self.vocab = os.path.join(root, "vocab", workdir_lib.VOCAB_FILE)
    self.cache_dir = os.path.join(root, "jax_cache")
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, "vocab.lock")):  # One pytest-xdist worker builds them.
      if not os.path.exists(self.vocab):  # Builds the data and trains the vocabulary.
        vocab.load_or_train(self.config(), os.path.dirname(self.vocab))

  def overrides(self, **extra) -> dict[str, Any]:
    """TINY, the shared data dir, and `extra` ('train__steps' or 'train.steps' keys)."""
    values = {**TINY, "data.data_dir": self.data_dir}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return values

  def config(self, **extra) -> ml_collections.FrozenConfigDict:
    """The config a run with these overrides trains."""
    return config_lib.load_config(EXPERIMENT, {k: str(v) for k, v in
                                               self.overrides(**extra).items()})

  def env(self, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
        "JAX_COMPILATION_CACHE_DIR": self.cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    })
    return env

  def new_workdir(self, path: str) -> str:
    """An empty workdir holding the shared vocabulary."""
    os.makedirs(path)
    shutil.copy(self.vocab, path)
    return path

  def train_args(self, workdir: str, **extra) -> list[str]:
    args = ["train", "--config", EXPERIMENT, "--workdir", workdir]
    return args + [f"--config.{k}={v}" for k, v in self.overrides(**extra).items()]

  def run(self, args: list[str], devices: int = 1, stdin: str | None = None
          ) -> subprocess.CompletedProcess:
    """`python -m jaxformer ARGS`, waited for; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "jaxformer", *args], cwd=REPO,
                          env=self.env(devices), input=stdin, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)

  def python(self, code: str, args: list[str], devices: int = 1) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` in the environment of the runs."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=self.env(devices),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

  def start(self, args: list[str], devices: int = 1, code: str | None = None
            ) -> subprocess.Popen:
    """`python -m jaxformer ARGS` (or `python -c CODE ARGS`) in the background; stderr to a
    pipe, stdout discarded."""
    command = ["-m", "jaxformer"] if code is None else ["-c", code]
    return subprocess.Popen([sys.executable, *command, *args], cwd=REPO,
                            env=self.env(devices), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  def train(self, workdir: str, devices: int = 1, **extra) -> subprocess.CompletedProcess:
    """Trains (or resumes) in `workdir`; fails the test unless the run exits with status 0."""
    result = self.run(self.train_args(workdir, **extra), devices)
    assert result.returncode == 0, f"training failed:\n{result.stderr[-3000:]}"
    return result

  def trained_once(self, name: str, overrides: dict[str, Any], devices: int = 1) -> str:
    """The workdir `name`, trained with `overrides` on `devices` once per session (by whichever
    pytest-xdist worker asks first; the others wait for it). Copy it before changing it."""
    workdir = os.path.join(self.root, name)
    done = os.path.join(self.root, f"{name}.done")
    with _locked(os.path.join(self.root, f"{name}.lock")):
      if not os.path.exists(done):
        shutil.rmtree(workdir, ignore_errors=True)
        self.train(self.new_workdir(workdir), devices, **overrides)
        open(done, "w").close()
    return workdir

  def slow_decoding(self) -> str:
    """A workdir of SLOW_DECODING (trained once per session)."""
    return self.trained_once("slow_decoding", SLOW_DECODING)

  def reference(self) -> str:
    """The reference workdir (trained once per session)."""
    return self.trained_once("reference", REFERENCE)


@contextlib.contextmanager
def _locked(path: str):
  """Holds an exclusive flock on `path` (created): one process at a time inside."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def session_runs(tmp_path_factory) -> Runs:
  """The Runs of this pytest session: one directory for every test module and, under
  pytest-xdist, for every worker (the parent of the workers' basetemp), so that the data, the
  vocabulary, the runs trained once and the compilation cache are made once, not per worker."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return Runs(str(base / "jaxformer_runs"))


def copy_workdir(source: str, target: str) -> str:
  shutil.copytree(source, target)
  return target


def wait_for(condition, what: str, process: subprocess.Popen | None = None,
             timeout_s: float = RUN_TIMEOUT_S, poll_s: float = 0.02) -> None:
  """Polls `condition()` until true; fails if `process` ends first or after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    if process is not None and process.poll() is not None:
      raise AssertionError(f"the run ended (status {process.returncode}) before {what}:\n"
                           f"{process.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(poll_s)


def stop(process: subprocess.Popen, signum: int = signal.SIGKILL) -> tuple[int, str]:
  """Sends `signum` to a started run and waits for it: (exit status, stderr)."""
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
  return process.returncode, stderr


# --- Signals in the middle of decoding. -------------------------------------------------------

# `python -c` code that runs the jaxformer command of its arguments as `jaxformer` does, and
# also prints DECODE_MARK and the clock on stderr as each batch of beam search starts (in an
# evaluation, a translation, the training loop's validation): when to send a signal, and how
# many batches started after it.
DECODE_MARK = "test: decoding a batch at"
DECODE_MARKS = textwrap.dedent(f"""
    import sys, time
    from jaxformer import cli, decode
    def marked(method):
      def decode_marked(*args, **kwargs):
        print(f"{DECODE_MARK} {{time.monotonic():.6f}}", file=sys.stderr, flush=True)
        return method(*args, **kwargs)
      return decode_marked
    for name in ("decode_sharded", "decode_local"):  # Every batch goes through one of them.
      setattr(decode.ParallelDecoder, name, marked(getattr(decode.ParallelDecoder, name)))
    sys.exit(cli.main(sys.argv[1:]))
""")


class Watched:
  """A started run (`Runs.start`) whose stderr a thread reads as it comes."""

  def __init__(self, process: subprocess.Popen):
    self.process = process
    self.lines: list[str] = []
    self.times: list[float] = []  # The clock when each line was read.
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.process.stderr:
      self.times.append(time.monotonic())
      self.lines.append(line.rstrip("\n"))

  def time_of(self, text: str) -> float:
    """The clock when the first line holding `text` was read; fails if none was."""
    for read, line in zip(list(self.times), list(self.lines)):
      if text in line:
        return read
    raise AssertionError(f"no line with {text!r}:\n" + "\n".join(self.lines[-40:]))

  def marks(self) -> list[float]:
    """The clock (time.monotonic, the same in every process) at each decoding batch's start."""
    return [float(line.split()[-1]) for line in list(self.lines) if line.startswith(DECODE_MARK)]

  def wait_until(self, condition, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Polls `condition()`; fails, showing the end of stderr, if the run ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
      if self.process.poll() is not None or time.monotonic() > deadline:
        self._reader.join(timeout=10)
        raise AssertionError(f"no {what} (status {self.process.poll()}):\n"
                             + "\n".join(self.lines[-40:]))
      time.sleep(0.02)

  def wait_for_marks(self, count: int) -> list[float]:
    """The marks, once `count` decoding batches have started."""
    self.wait_until(lambda: len(self.marks()) >= count, f"{count} decoding batches")
    return self.marks()

  def wait_for_line(self, text: str) -> None:
    self.wait_until(lambda: text in self.lines, repr(text))

  def signal(self, signum: int) -> float:
    """Sends `signum`; returns the clock just before."""
    sent = time.monotonic()
    self.process.send_signal(signum)
    return sent

  def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, float, str]:
    """(exit status, the clock when it ended, stderr) once the run has ended; fails (and kills
    the run) if it has not ended within `timeout_s`."""
    try:
      status = self.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
      self._reader.join(timeout=10)
      raise AssertionError(f"the run was still going {timeout_s} s later:\n"
                           + "\n".join(self.lines[-40:])) from None
    ended = time.monotonic()
    self._reader.join(timeout=60)
    return status, ended, "\n".join(self.lines)


# --- Reading a workdir. -----------------------------------------------------------------------

def metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
  """The entries of `<workdir>/metrics.jsonl` (of one split), in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  return [e for e in entries if split is None or e["split"] == split]


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_state(workdir: str, step: int) -> tuple[Any, dict]:
  """(train state as numpy arrays, data iterator state) saved at `step`, through jaxformer's
  Checkpointer, restored onto one device of this process whatever the run trained on."""
  run_config = workdir_lib.read_run_config(workdir)
  one_device = run_config.to_dict()
  one_device["parallel"].update(strategy="mesh", fsdp=1)
  config = ml_collections.FrozenConfigDict(one_device)
  strategy = parallel.make_strategy(config, jax.devices()[:1])
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, workdir_lib.VOCAB_FILE))
  iterator = pipeline.make_train_iterator(config, tokenizer,
                                          workdir_lib.resolve_data_dir(config, workdir))
  with checkpoint.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                               keep=config.checkpoint.keep) as checkpointer:
    state = checkpointer.restore(step, strategy.abstract_state(), iterator)
  return jax.device_get(state), iterator.get_state()


def assert_trees_identical(a: Any, b: Any) -> None:
  """Same structure, and every leaf bit-identical (np.array_equal, same dtype and shape)."""
  leaves_a, tree_a = jax.tree.flatten_with_path(a)[0], jax.tree.structure(a)
  leaves_b, tree_b = jax.tree.flatten_with_path(b)[0], jax.tree.structure(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    where = jax.tree_util.keystr(path)
    assert x.dtype == y.dtype and x.shape == y.shape, where
    assert np.array_equal(x, y), f"{where} differs (max |a - b| = {np.max(np.abs(x - y))})"


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]
