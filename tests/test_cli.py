"""`jaxformer train|evaluate|translate` as a user runs them (subprocesses): training lowers the
validation loss and logs the documented metrics; bad input ends with one line and status 2."""

import io
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sacrebleu

from jaxformer import checkpoint, cli, devices
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, text, tokenizer as tokenizer_lib

from tests import run_testing
from tests.run_testing import HALF, REFERENCE_STEPS

pytestmark = pytest.mark.slow

TRAIN_KEYS = {"step", "split", "loss", "accuracy", "learning_rate", "tokens_per_second",
              "step_time", "mfu", "grad_norm"}
VALIDATION_KEYS = {"step", "split", "loss", "accuracy", "exact_match", "bleu", "chrf"}
EVALUATE_KEYS = {"loss", "accuracy", "exact_match", "bleu", "bleu_signature", "chrf",
                 "chrf_signature", "examples", "decoded_examples"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


def assert_one_error_line(result, *fragments):
  """Status 2 and exactly one line on stderr, 'error: ...', holding every fragment."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0]
  return lines[0]


# --- train. -----------------------------------------------------------------------------------

def test_default_experiment_lowers_the_validation_loss_and_logs_the_documented_keys(runs):
  workdir = runs.reference()  # The default experiment, shrunk, REFERENCE_STEPS steps.
  train = run_testing.metrics(workdir, "train")
  validation = run_testing.metrics(workdir, "validation")
  assert [e["step"] for e in train] == list(range(10, REFERENCE_STEPS + 1, 10))
  assert [e["step"] for e in validation] == [HALF, REFERENCE_STEPS]
  for entry in train:
    assert TRAIN_KEYS <= set(entry), TRAIN_KEYS - set(entry)
    assert all(math.isfinite(entry[k]) and entry[k] > 0 for k in TRAIN_KEYS - {"split"})
  for entry in validation:
    assert VALIDATION_KEYS <= set(entry), VALIDATION_KEYS - set(entry)

  # A model that guesses uniformly over the V pieces has a (smoothed) loss of ln V.
  vocab = tokenizer_lib.Tokenizer.load(os.path.join(workdir, "vocab.model")).vocab_size
  first, last = validation[0]["loss"], validation[-1]["loss"]
  assert last < first - 0.3, (first, last)
  assert last < math.log(vocab) - 1.0, (last, math.log(vocab))
  assert validation[-1]["accuracy"] > validation[0]["accuracy"]


@pytest.mark.parametrize("override, fragments", [
    ("train.stepz=5", ["unknown config key train.stepz", "did you mean train.steps?"]),
    ("train.steps=many", ["train.steps='many' is not a valid int"]),
    ("train.batch_size=7", ["train.batch_size=7 is not divisible by the 8 devices"]),
])
def test_a_bad_config_stops_before_any_work_with_one_line(runs, tmp_path, override, fragments):
  workdir = str(tmp_path / "never_created")
  result = runs.run(["train", "--config", "default", "--workdir", workdir,
                     f"--config.{override}"], devices=8)
  assert_one_error_line(result, *fragments)
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    runs, tmp_path):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  result = runs.run(runs.train_args(workdir, **{
      "train.learning_rate": 1e30, "train.steps": 50, "checkpoint.every_steps": 1,
      "train.log_every_steps": 1}))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # The log of the steps before it, then one error line, the last.
  line = result.stderr.strip().splitlines()[-1]
  assert run_testing.error_lines(result.stderr) == [line]
  found = re.search(r"the training (loss|gradient norm) is (nan|inf|-inf) at step (\d+); the "
                    r"last good checkpoint is step (\d+) in ", line)
  assert found, line
  bad_step, good_step = int(found.group(3)), int(found.group(4))
  # Every step before the bad one was saved (every_steps=1), and none from it on.
  saved = run_testing.checkpoint_steps(workdir)
  assert saved == list(range(1, bad_step)) and good_step == bad_step - 1, (saved, line)
  state, _ = run_testing.load_state(workdir, good_step)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))
  # Nothing of the diverged step was logged.
  assert [e["step"] for e in run_testing.metrics(workdir, "train")] == saved


# Saves every 10 steps, evaluations every 20 (and at the end), every save kept, the best by loss.
KEEP_BEST = {"train.steps": 40, "checkpoint.every_steps": 10, "train.eval_every_steps": 20,
             "checkpoint.keep": 10, "checkpoint.keep_best": "loss", "train.log_every_steps": 10}


def recorded_metrics(workdir):
  """{step: the metrics orbax recorded beside it, or None}, read as orbax reads them."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True, best_fn=lambda m: m["loss"],
                                           best_mode="min"))
  try:
    return {step: manager.metrics(step) for step in manager.all_steps()}
  finally:
    manager.close()


def best_validation_step(workdir, steps):
  """Of `steps`, the one with the lowest validation loss in metrics.jsonl."""
  losses = {e["step"]: e["loss"] for e in run_testing.metrics(workdir, "validation")}
  return min((s for s in steps if s in losses), key=losses.get)


def test_keep_best_ranks_a_checkpoint_by_its_own_evaluation_only_and_step_best_names_it(
    runs, tmp_path):
  """A save at a step that did not evaluate carries no score (not the last evaluation's), so
  `best` is the best evaluated step kept, even when the newest step is not one."""
  workdir = runs.trained_once("keep_best", KEEP_BEST)
  recorded = recorded_metrics(workdir)
  assert sorted(recorded) == [10, 20, 30, 40]
  assert [step for step, m in recorded.items() if m is None] == [10, 30], recorded
  validation = {e["step"]: e["loss"] for e in run_testing.metrics(workdir, "validation")}
  assert {step: m["loss"] for step, m in recorded.items() if m} == pytest.approx(
      {20: validation[20], 40: validation[40]})
  best = best_validation_step(workdir, [10, 20, 30, 40])
  assert checkpoint.checkpoint_dir(workdir, "best")[1] == best

  # Without step 40, the newest is 30, saved between evaluations: the best is 20.
  copy = run_testing.copy_workdir(workdir, str(tmp_path / "w"))
  shutil.rmtree(os.path.join(copy, "checkpoints", "40"))
  assert checkpoint.checkpoint_dir(copy, None)[1] == 30
  assert checkpoint.checkpoint_dir(copy, "best")[1] == 20


# --- evaluate. --------------------------------------------------------------------------------

def test_evaluate_prints_one_json_object_and_appends_it_as_the_test_split(runs, tmp_path):
  workdir = run_testing.copy_workdir(runs.reference(), str(tmp_path / "w"))
  before = run_testing.metrics(workdir)
  result = runs.run(["evaluate", "--workdir", workdir])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  printed = json.loads(lines[0])
  assert EVALUATE_KEYS <= set(printed), EVALUATE_KEYS - set(printed)
  assert printed["checkpoint"] == REFERENCE_STEPS
  assert printed["bleu_signature"].startswith("nrefs:1|")
  assert 0.0 <= printed["exact_match"] <= 1.0 and 0.0 <= printed["accuracy"] <= 1.0

  after = run_testing.metrics(workdir)
  assert after[:len(before)] == before and len(after) == len(before) + 1
  appended = after[-1]
  assert appended["split"] == "test" and appended["step"] == REFERENCE_STEPS
  assert {k: appended[k] for k in EVALUATE_KEYS} == {k: printed[k] for k in EVALUATE_KEYS}


SAMPLE = re.compile(r"  source:      (.*)\n  reference:   (.*)\n  translation: (.*)\n")


def test_evaluate_of_the_best_step_on_the_first_examples_writes_their_hypotheses(runs, tmp_path):
  workdir = run_testing.copy_workdir(runs.trained_once("keep_best", KEEP_BEST),
                                     str(tmp_path / "w"))
  out, n = tmp_path / "hypotheses.txt", 5
  result = runs.run(["evaluate", "--workdir", workdir, "--step", "best", "--split", "validation",
                     "--max-examples", str(n), "--samples", str(n), "--hypotheses", str(out)])
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout)
  assert printed["checkpoint"] == best_validation_step(workdir, [10, 20, 30, 40])
  assert printed["examples"] == printed["decoded_examples"] == n
  # Teacher-forced over the same first n examples: their target tokens, each with its EOS.
  config = workdir_lib.read_run_config(workdir)
  references = pipeline.eval_references(config, workdir_lib.resolve_data_dir(config, workdir),
                                        "validation")[:n]
  vocab = tokenizer_lib.Tokenizer.load(os.path.join(workdir, "vocab.model"))
  assert printed["num_tokens"] == sum(min(len(vocab.encode(target)) + 1, config.data.max_len)
                                      for _, target in references)

  # One line per example, in the split's order: the samples pair them with their sources.
  hypotheses = out.read_bytes().decode("utf-8").split("\n")
  assert hypotheses[-1] == "" and len(hypotheses) == n + 1, hypotheses
  samples = SAMPLE.findall(result.stderr)
  assert [source for source, _, _ in samples] == [source for source, _ in references]
  assert [translation for _, _, translation in samples] == hypotheses[:-1]
  targets = [target for _, target in references]
  assert printed["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses[:-1], [targets]).score)
  assert f"sacrebleu chrF signature: {printed['chrf_signature']}" in result.stderr
  assert printed["chrf_signature"].startswith("nrefs:1|")


def test_only_the_first_process_writes_the_hypotheses(tmp_path, monkeypatch):
  """Every process of a pod has every hypothesis; one file, from process 0."""
  first, other = tmp_path / "first.txt", tmp_path / "other.txt"
  cli._write_hypotheses(str(first), ["uno", "dos\ntres", ""])
  assert first.read_bytes() == b"uno\ndos tres\n\n"  # A hypothesis never spans two lines.
  monkeypatch.setattr(devices, "is_first_process", lambda: False)
  cli._write_hypotheses(str(other), ["uno"])
  assert not other.exists()


@pytest.mark.parametrize("command", ["evaluate", "translate"])
def test_a_workdir_without_checkpoints_is_one_line(runs, tmp_path, capsys, command):
  workdir = runs.new_workdir(str(tmp_path / "w"))
  status = cli.main([command, "--workdir", workdir])  # In this process: it is only the error.
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert status == 2 and captured.out == ""
  assert lines == [f"error: no checkpoints in {os.path.join(workdir, 'checkpoints')}; train "
                   "first (jaxformer train --workdir ...)"]


# --- translate. -------------------------------------------------------------------------------

# Sources of different lengths, so that sorting by length (as translate does to batch them)
# changes their order; blank lines in between.
LINES = ["three hundred twelve", "", "one", "nine thousand nine hundred ninety-nine", "   ",
         "forty-two", "eight million", "", "seventy"]


def translate(runs, workdir, lines, tmp_path, name):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  result = runs.run(["translate", "--workdir", workdir, "--input", str(path)])
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.splitlines()


def test_translate_keeps_the_line_count_the_order_and_the_empty_lines(runs, tmp_path):
  workdir = runs.reference()
  forward = translate(runs, workdir, LINES, tmp_path, "forward.txt")
  backward = translate(runs, workdir, LINES[::-1], tmp_path, "backward.txt")
  assert len(forward) == len(LINES)
  assert [out for line, out in zip(LINES, forward) if not line.strip()] == ["", "", ""]
  # Each line's translation does not depend on where the line is in the file.
  assert backward == forward[::-1]
  # (Which the two lists can only show when the translations differ from each other.)
  assert len({out for line, out in zip(LINES, forward) if line.strip()}) >= 3, forward
# Lines holding characters str.splitlines breaks at (U+2028, U+2029, form feed, NEL), to be
# read after a UTF-8 byte-order mark. The vocabulary reads U+2028 and form feed as spaces, so
# lines 0 and 2 translate like their twins, lines 4 and 5.
SEPARATED = ["three\u2028hundred twelve", "", "forty\x0ctwo", "seven\x85", "three hundred twelve",
             "forty two", "one", "nine\u2029thousand"]


def test_translate_gives_one_line_per_line_whatever_is_inside_the_lines(runs, tmp_path):
  workdir = runs.reference()
  data = text.BOM + "".join(line + "\n" for line in SEPARATED).encode()
  source, out = tmp_path / "in.txt", tmp_path / "out.txt"
  source.write_bytes(data)
  result = runs.run(["translate", "--workdir", workdir, "--input", str(source),
                     "--output", str(out)])
  assert result.returncode == 0, result.stderr[-3000:]
  written = out.read_bytes()
  assert b"\r" not in written and written.count(b"\n") == len(SEPARATED), written
  translations = written.decode().split("\n")[:-1]
  assert translations[1] == ""
  assert (translations[0], translations[2]) == (translations[4], translations[5]), translations

  # The same bytes on stdin, the translations on stdout.
  piped = subprocess.run([sys.executable, "-m", "jaxformer", "translate", "--workdir", workdir],
                         input=data, capture_output=True, cwd=run_testing.REPO,
                         env=runs.env(1), timeout=run_testing.RUN_TIMEOUT_S)
  assert piped.returncode == 0, piped.stderr.decode()[-3000:]
  assert piped.stdout.decode().split("\n") == translations + [""]


def test_translate_of_stdin_that_is_not_utf8_is_one_line_naming_the_line(
    runs, capsys, monkeypatch):
  # In this process (loading the model is all it does before reading); cli.main is what the
  # command runs, and it turns the error into its one line and the status.
  stdin = io.TextIOWrapper(io.BytesIO(b"one\nforty two\nse\xffven\nten\n"), encoding="utf-8")
  monkeypatch.setattr(sys, "stdin", stdin)
  status = cli.main(["translate", "--workdir", runs.reference()])
  captured = capsys.readouterr()
  assert status == 2 and captured.out == ""
  assert captured.err.strip().splitlines() == [
      "error: stdin:3: invalid UTF-8 at byte offset 16 (byte 3 of line 3); save it as UTF-8"]


# 37 lines (blank ones among them): two chunks of 16 and one of 5 on the pod below.
MORE = ["twelve", "five hundred five", "thirty", "two million", "eleven"]
LINES_37 = [(LINES + MORE)[(5 * i) % len(LINES + MORE)] for i in range(37)]


@pytest.fixture(scope="module")
def translated_37(runs, tmp_path_factory):
  """(path, lines, translations) of LINES_37, translated by one process on one device."""
  path = tmp_path_factory.mktemp("translate") / "in37.txt"
  return path, LINES_37, translate(runs, runs.reference(), LINES_37, path.parent, path.name)


def test_translate_interactive_answers_each_line_before_the_next_is_sent(runs, translated_37):
  _, lines, expected = translated_37
  process = subprocess.Popen(
      [sys.executable, "-m", "jaxformer", "translate", "--workdir", runs.reference(),
       "--interactive"], cwd=run_testing.REPO, env=runs.env(1), stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  answers = queue.Queue()
  threading.Thread(target=lambda: [answers.put(line) for line in process.stdout],
                   daemon=True).start()
  try:
    asked = [i for i, line in enumerate(lines) if line.strip()][:3]
    asked.insert(1, lines.index(""))
    for number, i in enumerate(asked):  # The first answer waits for loading and compiling.
      process.stdin.write(lines[i].encode() + b"\n")
      process.stdin.flush()
      answer = answers.get(timeout=run_testing.RUN_TIMEOUT_S if number == 0 else 60)
      assert answer.decode() == expected[i] + "\n", (i, answer)
      assert process.poll() is None  # Still waiting for the next line.
    process.stdin.close()
    assert process.wait(timeout=60) == 0, process.stderr.read().decode()[-3000:]
    assert answers.empty()
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


# --- Signals. ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command, signum", [("evaluate", signal.SIGINT),
                                             ("translate", signal.SIGTERM)],
                         ids=["evaluate-SIGINT", "translate-SIGTERM"])
def test_evaluate_and_translate_stop_within_a_batch_on_ctrl_c_and_sigterm(
    runs, tmp_path, command, signum):
  """No guard: Ctrl-C is a KeyboardInterrupt once the batch in flight is done (then one line,
  status 130), SIGTERM the default action; nothing (no thread) keeps the process alive."""
  workdir = run_testing.copy_workdir(runs.slow_decoding(), str(tmp_path / "w"))
  if command == "evaluate":  # 32 batches of beam search over the validation split.
    args = ["evaluate", "--workdir", workdir, "--split", "validation"]
  else:  # 16 batches of 4, all of one shape.
    source = tmp_path / "in.txt"
    source.write_text("three hundred twelve\n" * 64, encoding="utf-8")
    args = ["translate", "--workdir", workdir, "--input", str(source), "--batch-size", "4"]
  run = run_testing.Watched(runs.start(args, code=run_testing.DECODE_MARKS))
  marks = run.wait_for_marks(3)
  sent = run.signal(signum)
  status, ended, stderr = run.wait(timeout_s=60)

  assert status == (130 if signum == signal.SIGINT else -signal.SIGTERM), stderr[-3000:]
  assert len([t for t in run.marks() if t > sent]) <= 1, run.marks()
  # Ctrl-C is timed to its line: the interpreter's exit after it (a second or more on a loaded
  # machine) is not the stop's. SIGTERM's default action ends the process at once.
  stopped = run.time_of("error: interrupted") if signum == signal.SIGINT else ended
  assert stopped - sent < 3 * (marks[2] - marks[1]) + 2.0, (stopped - sent, marks)
  assert "Traceback" not in stderr
  if signum == signal.SIGINT:
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
  assert run_testing.metrics(workdir, "validation") == run_testing.metrics(
      runs.slow_decoding(), "validation")  # Nothing of an interrupted evaluation is written.


def test_prepare_command(tmp_path, capsys):
  args = ["--config", "sort", "--workdir", str(tmp_path), "--config.data.num_train=50",
          "--config.data.num_validation=5", "--config.data.num_test=5"]
  assert cli.main(["prepare"] + args) == 0
  out = capsys.readouterr().out
  assert "train: 50 examples" in out and "test: 5 examples" in out
  assert str(tmp_path / "tfds") in out
  assert cli.main(["prepare"] + args + ["--config.data.num_tests=5"]) == 2
  assert "unknown config key data.num_tests" in capsys.readouterr().err


def test_the_old_prepare_command_still_works_with_a_note(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "jaxformer.data.sources", "--config", "sort", "--workdir",
       str(tmp_path), "--config.data.num_train=50", "--config.data.num_validation=5",
       "--config.data.num_test=5"],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "is now `jaxformer prepare`" in result.stderr
  assert "train: 50 examples" in result.stdout


# --- A closed output, and ./launch.sh after a stop. --------------------------------------------

def test_a_closed_output_pipe_does_not_stop_training(runs, tmp_path):
  """`jaxformer train ... 2>&1 | head -n 2`: what a dropped ssh session does to the output.
  The run drops its stderr and trains to its last step, saves it, and exits 0."""
  workdir = runs.new_workdir(str(tmp_path / "w"))
  steps = 30
  process = subprocess.Popen(
      [sys.executable, "-m", "jaxformer", *runs.train_args(
          workdir, train__steps=steps, train__log_every_steps=1, checkpoint__every_steps=1000,
          train__eval_every_steps=1000)],
      cwd=run_testing.REPO, env=runs.env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  head = [process.stdout.readline() for _ in range(2)]  # What `head -n 2` reads, then it goes.
  process.stdout.close()
  assert all(head), head
  assert process.wait(timeout=run_testing.RUN_TIMEOUT_S) == 0
  assert run_testing.checkpoint_steps(workdir) == [steps]
  assert [e["step"] for e in run_testing.metrics(workdir, "train")] == list(range(1, steps + 1))
  assert [e["step"] for e in run_testing.metrics(workdir, "validation")] == [steps]


def launch_sh(runs, workdir, **overrides) -> subprocess.Popen:
  """`./launch.sh default --workdir W ...` with the suite's environment (its venv, no install)."""
  env = dict(runs.env(1), VIRTUAL_ENV=os.path.dirname(os.path.dirname(sys.executable)))
  args = runs.train_args(workdir, **overrides)[5:]  # The --config.KEY=VALUE overrides.
  return subprocess.Popen(["bash", "launch.sh", "default", "--workdir", workdir, *args],
                          cwd=run_testing.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def trainer_pid(workdir) -> int | None:
  """The pid of the trainer holding `workdir` (its lock file names it), None before it does."""
  try:
    with open(os.path.join(workdir, "lock")) as f:
      return json.load(f)["pid"]
  except (OSError, ValueError, KeyError):
    return None


def test_launch_sh_passes_a_stop_through_as_75_and_evaluates_only_a_finished_run(runs,
                                                                                   tmp_path):
  stopped_dir = runs.new_workdir(str(tmp_path / "stopped"))
  launched = launch_sh(runs, stopped_dir, train__steps=1000, train__log_every_steps=1,
                       checkpoint__every_steps=1000, train__eval_every_steps=1000)
  run_testing.wait_for(lambda: run_testing.metrics(stopped_dir, "train"), "a first logged step",
                       launched)
  os.kill(trainer_pid(stopped_dir), signal.SIGTERM)  # The trainer only, as a preemption does.
  _, stderr = launched.communicate(timeout=run_testing.RUN_TIMEOUT_S)
  assert launched.returncode == 75, stderr[-3000:]
  assert not run_testing.metrics(stopped_dir, "test")  # No evaluation of a half-trained model.

  finished_dir = runs.new_workdir(str(tmp_path / "finished"))
  launched = launch_sh(runs, finished_dir, train__steps=10, train__eval_every_steps=1000)
  _, stderr = launched.communicate(timeout=run_testing.RUN_TIMEOUT_S)
  assert launched.returncode == 0, stderr[-3000:]
  assert [e["step"] for e in run_testing.metrics(finished_dir, "test")] == [10]
