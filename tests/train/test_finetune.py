"""Fine-tuning (`jaxformer train --init-from SOURCE[:STEP]`): the start from another run's
parameters and vocabulary, and the resume of such a run, through the command (subprocesses).

The refusals (another model, a missing or damaged source) are one-line errors before anything
is written: tests/test_bad_input.py.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, tokenizer as tokenizer_lib
from jaxformer.train import finetune, state as state_lib

from tests import run_testing

pytestmark = pytest.mark.slow

SOURCE_STEP = 30  # A step of the reference run (saved at 20, 30, 40), not its newest.
# The fine-tuning run: on 2 devices with fsdp (the source trained on 1), and with other
# settings than the source's wherever the model's shapes allow: learning rate, schedule,
# dropout, steps, and vocab_sample_size, with which a vocabulary trained here would differ
# from the source's. Saves step 2, the last, beside the start (step 0).
FINETUNE = {"train.steps": 2, "train.schedule": "constant", "train.warmup_steps": 0,
            "train.learning_rate": 0.01, "model.dropout_rate": 0.3, "parallel.fsdp": 2,
            "train.log_every_steps": 1, "train.eval_every_steps": 1000,
            "checkpoint.every_steps": 1000, "data.vocab_sample_size": 300}
DEVICES = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def finetuned(runs, tmp_path_factory):
  """(the source: the reference run, the fine-tuning run's workdir, its stderr)."""
  source = runs.reference()
  workdir = str(tmp_path_factory.mktemp("finetune") / "finetuned")  # Not created: no vocab.
  result = runs.run(runs.train_args(workdir, **FINETUNE)
                    + ["--init-from", f"{source}:{SOURCE_STEP}"], devices=DEVICES)
  assert result.returncode == 0, result.stderr[-3000:]
  return source, workdir, result.stderr


def test_the_start_is_the_source_s_parameters_with_a_fresh_optimizer_step_and_data(finetuned):
  source, workdir, stderr = finetuned
  assert f"fine-tuning from {source}:{SOURCE_STEP}" in stderr
  assert run_testing.checkpoint_steps(workdir) == [0, 2]
  start, data = run_testing.load_state(workdir, 0)
  source_state, _ = run_testing.load_state(source, SOURCE_STEP)
  run_testing.assert_trees_identical(start.params, source_state.params)
  # The optimizer's initial state for these parameters (Adam's moments all zero, count 0), not
  # the source's after its 30 updates.
  config = workdir_lib.read_run_config(workdir)
  fresh = jax.device_get(state_lib.state_from_params(config, source_state.params))
  run_testing.assert_trees_identical(start, fresh)
  assert int(source_state.step) == SOURCE_STEP
  # The data starts at its beginning: the state of a fresh iterator of this run's pipeline.
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, workdir_lib.VOCAB_FILE))
  iterator = pipeline.make_train_iterator(config, tokenizer,
                                          workdir_lib.resolve_data_dir(config, workdir))
  assert data == iterator.get_state()
  # Two updates later: counted from the fresh start, and the parameters have moved.
  end, _ = run_testing.load_state(workdir, 2)
  assert int(end.step) == 2
  counts = [int(x) for x in jax.tree.leaves(end.opt_state) if np.ndim(x) == 0]
  assert counts and set(counts) == {2}, counts
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), end.params,
                                       start.params))
  assert any(moved)


def test_the_vocabulary_is_the_source_s_and_config_json_records_the_source(finetuned):
  source, workdir, _ = finetuned
  with open(os.path.join(source, workdir_lib.VOCAB_FILE), "rb") as f:
    expected = f.read()
  with open(os.path.join(workdir, workdir_lib.VOCAB_FILE), "rb") as f:
    assert f.read() == expected
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as f:
    recorded = json.load(f)
  assert recorded["train"]["init_from"] == f"{source}:{SOURCE_STEP}"
  assert recorded["model"]["dropout_rate"] == 0.3 and recorded["train"]["schedule"] == "constant"


def test_a_resume_continues_the_run_from_its_own_checkpoint_without_the_source(
    runs, finetuned, tmp_path):
  source, finetuned_workdir, _ = finetuned
  workdir = run_testing.copy_workdir(finetuned_workdir, str(tmp_path / "w"))
  # A source that does not exist: the resume must not read one (nor start again from it).
  gone = str(tmp_path / "gone")
  result = runs.run(runs.train_args(workdir, **{**FINETUNE, "train.steps": 4})
                    + ["--init-from", gone], devices=DEVICES)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint at step 2" in result.stderr
  assert f"--init-from {gone} is not read" in result.stderr
  assert "fine-tuning from" not in result.stderr
  assert run_testing.checkpoint_steps(workdir) == [0, 2, 4]
  state, _ = run_testing.load_state(workdir, 4)
  assert int(state.step) == 4
  assert {int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0} == {4}
  # Steps 1 and 2 were not trained again: none of their records was set aside.
  assert [e["step"] for e in run_testing.metrics(workdir, "train")] == [1, 2, 3, 4]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.SUPERSEDED_DIR))
  # The run still records where its parameters came from.
  assert workdir_lib.read_run_config(workdir).train.init_from == f"{source}:{SOURCE_STEP}"


@pytest.mark.parametrize("spec, expected", [
    ("runs/a:30", ("runs/a", "30")), ("runs/a:best", ("runs/a", "best")),
    ("runs/a", ("runs/a", None)), ("runs/a:", ("runs/a", None)),
    ("runs/a:last2_10-20", ("runs/a", "last2_10-20")),
    ("gs://bucket/run", ("gs://bucket/run", None)),
    ("gs://bucket/run:40", ("gs://bucket/run", "40")),
])
def test_a_source_spec_splits_into_workdir_and_step(spec, expected):
  assert finetune.split_spec(spec) == expected
