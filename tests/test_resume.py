"""Resume, preemption, restore and averaging through the `jaxformer` command (subprocesses).

The expectation of every resume test is an uninterrupted run of the same config: a run that
stops (by itself, by SIGKILL, by SIGTERM) and resumes must end with the very same bits in every
parameter and in the optimizer state, with dropout on (the default experiment's 0.1).
"""

import hashlib
import json
import os
import re
import signal
import socket
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxformer import checkpoint, inference
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, tokenizer as tokenizer_lib
from jaxformer.train import parallel

from tests import checkpoint_testing, run_testing
from tests.run_testing import REFERENCE, REFERENCE_STEPS

pytestmark = pytest.mark.slow

# A shorter run for 8 simulated devices (which share the 2 cores of a test machine): 2 * 4
# steps, checkpoints every 2, evaluated at the end.
SHORT = {"train.steps": 8, "train.log_every_steps": 2, "train.eval_every_steps": 8,
         "checkpoint.every_steps": 2}
# Device layouts of the exact-resume test: (simulated devices, overrides with the schedule).
LAYOUTS = {
    "one_device": (1, REFERENCE),
    "pmap": (8, {**SHORT, "parallel.strategy": "pmap"}),
    "mesh_fsdp": (8, {**SHORT, "parallel.fsdp": 4}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(runs):
  """layout -> the workdir of its full run, uninterrupted (trained on first use)."""
  workdirs = {"one_device": runs.reference()}

  def get(layout):
    if layout not in workdirs:
      devices, overrides = LAYOUTS[layout]
      workdirs[layout] = runs.trained_once(f"uninterrupted_{layout}", overrides, devices)
    return workdirs[layout]

  return get


def assert_same_end(workdir, reference):
  """Parameters, optimizer state, step and data iterator state are bit-identical at the last
  step of `reference`."""
  step = run_testing.checkpoint_steps(reference)[-1]
  state, data = run_testing.load_state(workdir, step)
  expected_state, expected_data = run_testing.load_state(reference, step)
  assert int(state.step) == step
  run_testing.assert_trees_identical(state, expected_state)
  assert data == expected_data


def train_log_steps(workdir):
  return [entry["step"] for entry in run_testing.metrics(workdir, "train")]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stopping_halfway_and_resuming_is_bit_identical(runs, uninterrupted, tmp_path, layout):
  devices, overrides = LAYOUTS[layout]
  steps, every = overrides["train.steps"], overrides["checkpoint.every_steps"]
  workdir = runs.new_workdir(str(tmp_path / "w"))
  runs.train(workdir, devices, **{**overrides, "train.steps": steps // 2})
  assert run_testing.checkpoint_steps(workdir) == list(range(every, steps // 2 + 1, every))

  resumed = runs.train(workdir, devices, **overrides)  # train.steps raised.
  assert f"resumed from the checkpoint at step {steps // 2}" in resumed.stderr
  # Each step was trained once: a restart from scratch would log the first half again.
  log_every = overrides["train.log_every_steps"]
  assert train_log_steps(workdir) == list(range(log_every, steps + 1, log_every))
  assert_same_end(workdir, uninterrupted(layout))


def start_two_trainers(runs, args):
  """Starts two trainers with `args` at once; returns (the one that trains, the stderr of the
  one that stopped, how many seconds after its start it stopped)."""
  started_at = time.monotonic()
  trainers = [runs.start(args), runs.start(args)]
  run_testing.wait_for(lambda: any(t.poll() is not None for t in trainers), "a trainer to stop",
                       timeout_s=120)
  took = time.monotonic() - started_at
  stopped = next(t for t in trainers if t.poll() is not None)
  training = next(t for t in trainers if t is not stopped)
  _, stderr = stopped.communicate()
  assert stopped.returncode == 2, stderr[-3000:]
  return training, stderr, took


def past_the_first_checkpoint(workdir):
  """Whether a checkpoint is saved and a record of a later step written."""
  saved = run_testing.checkpoint_steps(workdir)
  try:
    records = run_testing.metrics(workdir)
  except ValueError:  # A line being written as we read.
    return False
  return bool(saved) and max(r["step"] for r in records) > saved[-1]


def test_sigkill_in_the_middle_then_resume_reaches_the_same_parameters(runs, uninterrupted,
                                                                       tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  # Evaluating at every step (a harmless change: it reads no training data) makes the run slow
  # enough to be killed in the middle; checkpoints every 2 steps; every step logged, as the
  # resumed run logs them, so that steps logged twice would show.
  every_step = {"train.eval_every_steps": 1, "checkpoint.every_steps": 2,
                "train.log_every_steps": 1}
  # Two trainers started together on the fresh workdir: one trains, the other stops at once.
  process, stderr, took = start_two_trainers(
      runs, runs.train_args(workdir, **{**REFERENCE, **every_step}))
  assert run_testing.error_lines(stderr) == stderr.strip().splitlines(), stderr[-3000:]
  assert len(stderr.strip().splitlines()) == 1
  assert f" is in use by another trainer (pid {process.pid} on host " in stderr
  assert took < 60, f"the second trainer took {took:.0f} s to stop"

  run_testing.wait_for(lambda: past_the_first_checkpoint(workdir), "a record past the first "
                       "checkpoint", process)
  status, _ = run_testing.stop(process, signal.SIGKILL)
  assert status == -signal.SIGKILL
  saved = run_testing.checkpoint_steps(workdir)
  assert saved and saved[-1] < REFERENCE_STEPS
  later = [r for r in run_testing.metrics(workdir) if r["step"] > saved[-1]]
  assert later

  # The killed trainer's lock died with it: a new trainer starts, and resumes.
  resumed = runs.train(workdir, **{**REFERENCE, "train.log_every_steps": 1})
  assert f"resumed from the checkpoint at step {saved[-1]}" in resumed.stderr
  superseded = os.path.join(workdir, "superseded", "metrics.1.jsonl")
  assert f"they are kept in {superseded}" in resumed.stderr
  with open(superseded) as f:
    assert [json.loads(line) for line in f] == later
  assert train_log_steps(workdir) == list(range(1, REFERENCE_STEPS + 1))  # Each step once.
  validation_steps = [r["step"] for r in run_testing.metrics(workdir, "validation")]
  assert validation_steps == sorted(set(validation_steps))
  assert_same_end(workdir, uninterrupted("one_device"))


def test_a_trainer_on_a_workdir_in_use_stops_at_once_and_writes_nothing(runs, tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  with workdir_lib.WorkdirLock(workdir) as lock:  # This process holds it, as a trainer does.
    before = snapshot(workdir)
    result = runs.run(runs.train_args(workdir, **REFERENCE))
    assert snapshot(workdir) == before
    with open(lock.path) as f:
      started = json.load(f)["started"]
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f"error: {workdir} is in use by another trainer (pid {os.getpid()} on host "
      f"{socket.gethostname()}, started {started}); wait for it to finish, stop it, or use "
      "another --workdir"]


def test_sigterm_sigint_and_sighup_each_save_the_step_exit_75_and_the_resume_is_bit_identical(
    runs, uninterrupted, tmp_path):
  """SIGTERM (preemption, `kill`), SIGINT (Ctrl-C) and SIGHUP (a dropped ssh session) stop the
  run at a saved step with status 75 (not 0: it did not finish), and the same command resumes:
  one run stopped by each in turn ends with the bits of the uninterrupted run."""
  workdir = runs.new_workdir(str(tmp_path / "w"))
  never = 1000  # Not due before the signal: the only checkpoints are the ones it asks for.
  args = runs.train_args(workdir, **{
      **REFERENCE, "train.steps": never, "checkpoint.every_steps": never,
      "train.log_every_steps": 1, "train.eval_every_steps": never})
  saved = []
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    logged = len(train_log_steps(workdir))
    process = runs.start(args)
    run_testing.wait_for(lambda: len(train_log_steps(workdir)) > logged, "a logged step",
                         process)
    status, stderr = run_testing.stop(process, signum)

    name = signal.Signals(signum).name
    assert status == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if f"stopped by {name}" in line]
    assert len(stopped) == 1, stderr[-3000:]
    step = int(re.search(rf"stopped by {name} at step (\d+);", stopped[0]).group(1))
    assert os.path.join(workdir, "checkpoints") in stopped[0]
    saved.append(step)
    assert run_testing.checkpoint_steps(workdir) == saved
    assert max(train_log_steps(workdir)) == step  # The step was finished, and it was the last.
  assert saved == sorted(saved) and saved[-1] < REFERENCE_STEPS, "the signals came too late"

  resumed = runs.train(workdir, **REFERENCE)  # The reference run's own settings from here on.
  assert f"resumed from the checkpoint at step {saved[-1]}" in resumed.stderr
  assert train_log_steps(workdir) == sorted(set(train_log_steps(workdir)))  # Each step once.
  assert train_log_steps(workdir)[-1] == REFERENCE_STEPS
  assert_same_end(workdir, uninterrupted("one_device"))


# Run as `jaxformer` runs, but the save of a stop takes two minutes: time for a second signal.
SLOW_STOP_SAVE = textwrap.dedent("""
    import sys, time
    from jaxformer import checkpoint, cli
    save = checkpoint.Checkpointer.save
    def slow_save(self, *args, **kwargs):
      print("test: saving slowly", file=sys.stderr, flush=True)
      time.sleep(120)
      return save(self, *args, **kwargs)
    checkpoint.Checkpointer.save = slow_save
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_ctrl_c_while_a_sigterm_stop_is_saving_ends_the_run_at_once(runs, tmp_path):
  """The second signal's KeyboardInterrupt goes through the loop's clean-up (which waits for
  saves in flight), and nothing, not the data pipeline's threads either, keeps the process."""
  workdir = runs.new_workdir(str(tmp_path / "w"))
  every_steps = 1000  # Never due: the only save is the one SIGTERM asks for.
  run = run_testing.Watched(runs.start(runs.train_args(workdir, **{
      "train.steps": every_steps, "checkpoint.every_steps": every_steps,
      "train.log_every_steps": 1, "train.eval_every_steps": every_steps}), code=SLOW_STOP_SAVE))
  run.wait_until(lambda: run_testing.metrics(workdir, "train"), "a first logged step")
  run.signal(signal.SIGTERM)
  run.wait_for_line("test: saving slowly")
  sent = run.signal(signal.SIGINT)
  status, ended, stderr = run.wait(timeout_s=60)

  assert status == 130, stderr[-3000:]
  assert ended - sent < 10, ended - sent  # Not the 120 s of the save.
  assert stderr.strip().splitlines()[-1] == "error: interrupted"
  assert "Traceback" not in stderr
  assert run_testing.checkpoint_steps(workdir) == []


def start_final_evaluation(runs, workdir):
  """A SLOW_DECODING run that evaluates every validation sentence at its last step, watched
  until the third batch of that evaluation's decoding started. Returns (run, marks, step)."""
  overrides = {**run_testing.SLOW_DECODING, "eval.bleu_examples": 256}
  run = run_testing.Watched(runs.start(runs.train_args(workdir, **overrides),
                                       code=run_testing.DECODE_MARKS))
  marks = run.wait_for_marks(3)
  step = overrides["train.steps"]
  assert f"step {step}: evaluating on validation" in run.lines, run.lines
  return run, marks, step


def test_sigterm_during_the_final_evaluation_stops_it_within_a_batch_and_saves_the_step(
    runs, tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  run, marks, step = start_final_evaluation(runs, workdir)
  sent = run.signal(signal.SIGTERM)
  status, ended, stderr = run.wait(timeout_s=60)

  assert status == 75, stderr[-3000:]  # A stopped run's status, as a stop between steps.
  assert "Traceback" not in stderr
  # The batch in flight when the signal came is finished; none starts after the check that
  # follows it (one may start between the check and the signal's arrival).
  assert len([t for t in run.marks() if t > sent]) <= 1, run.marks()
  # 32 decoding batches in all: the rest of the evaluation would have taken 29 more; the stop
  # (the batch in flight, the save) takes a few. Timed to the run's line that says it stopped:
  # the interpreter's exit after it (a second or more on a loaded machine) is not the stop's.
  batch_s = (marks[2] - marks[1])
  remaining_s = (32 - len(marks)) * batch_s
  stop_s = run.time_of(f"stopped by SIGTERM at step {step};") - sent
  assert stop_s < 0.5 * remaining_s, (stop_s, batch_s)
  assert run_testing.checkpoint_steps(workdir) == [step]
  assert not run_testing.metrics(workdir, "validation")  # Nothing of the evaluation is kept.
  assert f"stopped by SIGTERM at step {step};" in stderr
  assert (f"the evaluation of step {step} was interrupted; run it with `jaxformer evaluate "
          f"--workdir {workdir} --step {step} --split validation`") in stderr


def test_sigint_after_sigterm_during_the_evaluation_ends_the_run_at_once(runs, tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  run, marks, _ = start_final_evaluation(runs, workdir)
  sent = run.signal(signal.SIGTERM)
  run.signal(signal.SIGINT)  # Both come during one batch: Python sees SIGINT first.
  status, ended, stderr = run.wait(timeout_s=60)

  # As without the guard: killed by the SIGTERM, or Ctrl-C's KeyboardInterrupt (status 130,
  # whichever came second to Python), and no clean stop's save or log line.
  assert status in (-signal.SIGTERM, 130), (status, stderr[-3000:])
  assert "Traceback" not in stderr and "stopped by" not in stderr
  assert len([t for t in run.marks() if t > sent]) <= 1, run.marks()
  # Not the rest of the evaluation (29 more batches); the time includes the interpreter's exit.
  batch_s = (marks[2] - marks[1])
  assert ended - sent < max(3 * batch_s + 2.0, 0.5 * (32 - len(marks)) * batch_s)
  assert not run_testing.metrics(workdir, "validation")


# Run in a 1-device process: the parameters of the newest checkpoint through load_params, and
# the logits of the model on the batch in BATCH_FILE, saved to OUT_FILE.
ONE_DEVICE_LOGITS = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jaxformer import inference
    from jaxformer.model.transformer import Transformer
    workdir, batch_file, out_file = sys.argv[1:]
    assert jax.device_count() == 1, jax.devices()
    params, step, config = inference.load_params(workdir)
    batch = dict(np.load(batch_file))
    logits = Transformer(config=config.model).apply(
        {"params": params}, batch["inputs"], batch["targets"], deterministic=True)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out_file, logits=np.asarray(logits), step=step, **flat)
""")


def test_fsdp_checkpoint_from_8_devices_gives_the_same_logits_on_1(runs, uninterrupted,
                                                                  tmp_path):
  workdir = uninterrupted("mesh_fsdp")
  run_config = workdir_lib.read_run_config(workdir)
  assert run_config.parallel.fsdp == 4

  # The state as the training run holds it: sharded over the fsdp axis of 8 devices.
  strategy = parallel.make_strategy(run_config)
  with checkpoint.Checkpointer(workdir, every_steps=10, keep=3) as checkpointer:
    step = checkpointer.latest_step()
    tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, "vocab.model"))
    iterator = pipeline.make_train_iterator(run_config, tokenizer,
                                            workdir_lib.resolve_data_dir(run_config, workdir))
    state = checkpointer.restore(step, strategy.abstract_state(), iterator)
  sharded = [leaf for leaf in jax.tree.leaves(state.params)
             if len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated]
  assert sharded, "no parameter is sharded: the test would not cross layouts"

  rng = np.random.RandomState(0)
  batch = {"inputs": rng.randint(4, tokenizer.vocab_size, (8, 12)).astype(np.int32),
           "targets": rng.randint(4, tokenizer.vocab_size, (8, 10)).astype(np.int32)}
  batch_file, out_file = str(tmp_path / "batch.npz"), str(tmp_path / "out.npz")
  np.savez(batch_file, **batch)
  expected = jax.jit(lambda params, inputs, targets: strategy.model.apply(
      {"params": params}, inputs, targets, deterministic=True))(
          state.params, *jax.device_put((batch["inputs"], batch["targets"]),
                                        strategy.replicated))

  process = runs.python(ONE_DEVICE_LOGITS, [workdir, batch_file, out_file], devices=1)
  assert process.returncode == 0, process.stderr[-3000:]
  out = np.load(out_file)
  assert int(out["step"]) == step
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]:
    np.testing.assert_array_equal(out[jax.tree_util.keystr(path)], leaf)
  np.testing.assert_allclose(out["logits"], np.asarray(expected), rtol=1e-5, atol=1e-5)


def digest(directory):
  """A hash of every file's path and bytes under `directory`."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def snapshot(directory):
  """{path: bytes (None for a directory)} of everything under `directory`."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        found[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return found


def test_average_last_two_through_the_cli_and_use_it(runs, tmp_path):
  workdir = run_testing.copy_workdir(runs.reference(), str(tmp_path / "w"))
  steps = run_testing.checkpoint_steps(workdir)
  first, last = steps[-2], steps[-1]
  before = {s: digest(os.path.join(workdir, "checkpoints", str(s))) for s in steps}

  result = runs.run(["average", "--workdir", workdir, "--last", "2"])
  assert result.returncode == 0, result.stderr[-3000:]
  name = f"last2_{first}-{last}"
  assert result.stdout.strip() == os.path.join(workdir, "averaged", name)

  # The element-wise mean, computed here in float64 from the two checkpoints' parameters.
  averaged, label, _ = inference.load_params(workdir, step=name)
  a, _, _ = inference.load_params(workdir, step=first)
  b, _, _ = inference.load_params(workdir, step=last)
  expected = jax.tree.map(
      lambda x, y: ((np.float64(x) + np.float64(y)) / 2).astype(np.asarray(x).dtype), a, b)
  assert label == name
  run_testing.assert_trees_identical(jax.device_get(averaged), expected)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                       jax.tree.leaves(jax.device_get(b))))
  assert {s: digest(os.path.join(workdir, "checkpoints", str(s))) for s in steps} == before

  evaluated = runs.run(["evaluate", "--workdir", workdir, "--step", name])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads(evaluated.stdout)["checkpoint"] == name
  translated = runs.run(["translate", "--workdir", workdir, "--step", name],
                        stdin="one\n\nforty-two\n")
  assert translated.returncode == 0, translated.stderr[-3000:]
  assert len(translated.stdout.splitlines()) == 3 and translated.stdout.splitlines()[1] == ""

  averaged_dir = os.path.join(workdir, "averaged", name)
  kept = digest(averaged_dir)
  again = runs.run(["average", "--workdir", workdir, "--last", "2"])
  assert again.returncode == 2
  assert run_testing.error_lines(again.stderr) == again.stderr.strip().splitlines()
  assert len(again.stderr.strip().splitlines()) == 1
  assert "already exists; it is never overwritten" in again.stderr
  assert digest(averaged_dir) == kept


def test_damaged_newest_checkpoints_are_reported_and_training_falls_back(runs, tmp_path):
  """The newest checkpoint has four flipped bytes in an array chunk (orbax reads other numbers
  without an error: only the checksums see it), the one before it truncated files."""
  workdir = run_testing.copy_workdir(runs.reference(), str(tmp_path / "w"))
  steps = run_testing.checkpoint_steps(workdir)
  newest, previous, intact = steps[-1], steps[-2], steps[-3]
  flipped = checkpoint_testing.flip_four_bytes(os.path.join(workdir, "checkpoints", str(newest)))
  truncated = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(previous), "state")):
    if os.path.basename(root) == "d":  # The OCDBT data files of the arrays.
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  reasons = {newest: rf"is damaged \({re.escape(flipped[0])} does not match its checksum\)",
             previous: r"is damaged \(truncated file state/.+\)"}

  # Evaluation and translation name the damage and the steps to choose from instead, on one
  # line (no traceback).
  evaluated = runs.run(["evaluate", "--workdir", workdir, "--step", str(newest)])
  translated = runs.run(["translate", "--workdir", workdir, "--step", str(previous)],
                        stdin="one\n")
  for result, step in ((evaluated, newest), (translated, previous)):
    assert result.returncode == 2
    assert re.fullmatch(rf"error: checkpoint at step {step} in {re.escape(workdir)} "
                        rf"{reasons[step]}; choose another with --step \(available steps: "
                        rf"{', '.join(map(str, steps))}\)", result.stderr.strip()), \
        result.stderr[-3000:]

  # Resuming to the same last step: back to `intact`, then the lost steps are trained again.
  result = runs.train(workdir, **REFERENCE)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step, fallback in ((newest, previous), (previous, intact)):
    moved = os.path.join(workdir, "damaged", str(step))
    assert re.search(rf"checkpoint at step {step} in {re.escape(ckpt_dir)} {reasons[step]}; "
                     rf"falling back to step {fallback} \(the damaged one is kept in "
                     rf"{re.escape(moved)}\)", result.stderr), result.stderr[-3000:]
    assert os.path.isdir(moved)  # Kept, not deleted.
  assert f"resumed from the checkpoint at step {intact}" in result.stderr
  assert run_testing.checkpoint_steps(workdir)[-1] == newest
  assert_same_end(workdir, runs.reference())


def test_a_changed_model_shape_on_resume_is_refused_naming_the_keys(runs, tmp_path):
  workdir = run_testing.copy_workdir(runs.reference(), str(tmp_path / "w"))
  before = digest(workdir)
  result = runs.run(runs.train_args(workdir, **{**REFERENCE, "model.d_model": 64,
                                                             "model.d_ff": 128}))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert "model.d_model (32 -> 64)" in lines[0] and "model.d_ff (64 -> 128)" in lines[0]
  assert "model.num_heads" not in lines[0]
  assert digest(workdir) == before  # Nothing written.


def test_restore_step_trains_again_from_an_older_checkpoint_keeping_the_newer(runs, tmp_path):
  reference = runs.reference()
  workdir = run_testing.copy_workdir(reference, str(tmp_path / "w"))
  steps = run_testing.checkpoint_steps(workdir)
  older, newer = steps[0], steps[1:]
  result = runs.run(runs.train_args(workdir, **REFERENCE) + ["--restore-step", str(older)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from the checkpoint at step {older}" in result.stderr
  superseded = os.path.join(workdir, "superseded")
  assert (f"the newer checkpoints ({', '.join(map(str, newer))}) are kept in {superseded}"
          in result.stderr)
  for step in newer:  # Kept as they were, out of the way ...
    assert (digest(os.path.join(superseded, str(step)))
            == digest(os.path.join(reference, "checkpoints", str(step))))
  # ... of this run, which saved those steps again: the same bits, as nothing changed.
  assert run_testing.checkpoint_steps(workdir) == steps
  assert_same_end(workdir, reference)
