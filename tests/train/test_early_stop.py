"""Early stopping (`train.early_stop_patience`): the count of evaluations without an improvement,
read back from metrics.jsonl on resume, and a run that stops by it (subprocesses)."""

import types

import pytest

from jaxformer.train import early_stop, loop

from tests import run_testing


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


def stopping(metric="loss", patience=2):
  return early_stop.EarlyStopping(metric=metric, patience=patience,
                                  lower_is_better=metric == "loss")


def test_it_stops_after_patience_evaluations_without_a_strict_improvement():
  early = stopping("loss", patience=2)
  assert [early.add(step, {"loss": loss}) for step, loss in
          [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.0), (5, 1.5), (6, 1.5), (7, 1.6)]] == [
              False, False, False, True, False, False, True]
  assert (early.best, early.best_step, early.since_best) == (1.5, 5, 2)
  higher = stopping("bleu", patience=1)
  assert not higher.add(1, {"bleu": 10.0}) and not higher.add(2, {"bleu": 12.0})
  assert higher.add(3, {"bleu": 11.0}) and higher.best_step == 2


def test_replay_counts_the_loop_s_evaluations_up_to_the_start_step_only():
  records = [
      {"step": 2, "split": "train", "loss": 0.1},  # Training, not an evaluation.
      {"step": 2, "split": "validation", "loss": 3.0},
      {"step": 4, "split": "validation", "loss": 2.0},
      # `jaxformer evaluate --split validation` of step 4: not an evaluation of the run.
      {"step": 4, "split": "validation", "loss": 9.0, "checkpoint": 4},
      {"step": 8, "split": "validation", "loss": 2.5},
      {"step": 6, "split": "validation", "loss": 2.5},
      {"step": -1, "split": "validation", "loss": 0.5, "checkpoint": "last2_2-4"},
      {"step": 10, "split": "validation", "loss": 4.0},  # After the start step.
      {"step": 9, "split": "validation", "loss": "nan"},
  ]
  early = stopping("loss", patience=3)
  early.replay(records, up_to=9)
  assert (early.best, early.best_step, early.since_best) == (2.0, 4, 2)
  assert not early.exhausted
  early.replay([], up_to=9)  # Nothing more.
  assert early.since_best == 2


def fake_run(steps, early):
  return types.SimpleNamespace(config=types.SimpleNamespace(train=types.SimpleNamespace(
      steps=steps)), early_stop=early)


def test_a_run_that_stopped_early_trains_nothing_more_when_run_again(capsys):
  early = stopping("loss", patience=1)
  early.replay([{"step": 2, "split": "validation", "loss": 1.0},
                {"step": 4, "split": "validation", "loss": 1.0}], up_to=4)
  result = loop._nothing_to_train(fake_run(10, early), 4)
  assert result.finished and result.stopped_early and result.step == 4
  assert "the run stopped early at step 4: validation loss has not improved" in (
      capsys.readouterr().err)
  assert loop._nothing_to_train(fake_run(10, stopping()), 4) is None
  assert loop._nothing_to_train(fake_run(10, None), 4) is None


# A learning rate too small to change any parameter's float32 value: every evaluation has the
# same validation loss, so none after the first improves. Evaluated (and saved) every 2 steps.
FLAT = {"train.schedule": "constant", "train.warmup_steps": 0, "train.learning_rate": 1e-30,
        "train.log_every_steps": 2, "train.eval_every_steps": 2, "checkpoint.every_steps": 2,
        "checkpoint.keep_best": "loss", "train.early_stop_patience": 2}


@pytest.mark.slow
def test_a_run_stops_after_exactly_patience_evaluations_without_improvement_across_a_resume(
    runs, tmp_path):
  """Evaluations at 2 (the best), 4 (1 without improvement): the run reaches train.steps=4.
  Resumed to 20 steps, it stops at 6, the 2nd evaluation without improvement, because the
  count survived the resume (counted afresh it would stop at 10)."""
  workdir = runs.new_workdir(str(tmp_path / "w"))
  first = runs.run(runs.train_args(workdir, **{**FLAT, "train.steps": 4}))
  assert first.returncode == 0, first.stderr[-3000:]
  assert "stopped early" not in first.stderr
  result = runs.run(runs.train_args(workdir, **{**FLAT, "train.steps": 20}))
  assert result.returncode == 0, result.stderr[-3000:]
  validation = run_testing.metrics(workdir, "validation")
  assert [e["step"] for e in validation] == [2, 4, 6]
  assert len({e["loss"] for e in validation}) == 1, validation  # As FLAT intends.
  assert max(e["step"] for e in run_testing.metrics(workdir, "train")) == 6
  assert run_testing.checkpoint_steps(workdir)[-1] == 6
  (record,) = run_testing.metrics(workdir, early_stop.SPLIT)
  assert record == {"step": 6, "split": "early_stop", "metric": "loss",
                    "best": validation[0]["loss"], "best_step": 2,
                    "evaluations_without_improvement": 2, "patience": 2}
  assert "stopped early at step 6: validation loss has not improved for 2 evaluation(s)" in (
      result.stderr)
