"""Tests of jaxformer/workdir.py: the run config recorded in a workdir, and which changes of it
a resumed run may make."""

import json
import os

import pytest

from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError


def write_config(workdir, **overrides):
  config = config_lib.get_default_config()
  config_lib.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
  workdir_lib.write_run_config(str(workdir), config)
  return config


def test_check_compatible_names_breaking_keys_and_allows_harmless_ones():
  saved = config_lib.get_default_config()
  harmless = config_lib.get_default_config()
  harmless.train.steps = saved.train.steps * 2
  harmless.model.dropout_rate = 0.3
  harmless.checkpoint.keep = 7
  assert workdir_lib.check_compatible(saved, harmless) == [
      "checkpoint.keep", "model.dropout_rate", "train.steps"]

  changed = config_lib.get_default_config()
  changed.model.d_model = 256
  changed.train.steps = 5
  with pytest.raises(CheckpointError, match=r"model\.d_model \(512 -> 256\)") as info:
    workdir_lib.check_compatible(saved, changed)
  assert "train.steps" not in str(info.value)

  learned = config_lib.get_default_config()
  learned.model.pos_encoding = "learned"
  longer = config_lib.get_default_config()
  longer.model.pos_encoding = "learned"
  longer.model.max_len = 512
  with pytest.raises(CheckpointError, match=r"model\.max_len \(256 -> 512\)"):
    workdir_lib.check_compatible(learned, longer)
  sinusoidal_longer = config_lib.get_default_config()
  sinusoidal_longer.model.max_len = 512  # Sinusoidal positions have no parameters.
  assert workdir_lib.check_compatible(saved, sinusoidal_longer) == ["model.max_len"]


def test_write_run_files_keeps_history_and_refuses_incompatible_configs(tmp_path):
  workdir = str(tmp_path)
  write_config(tmp_path, **{"train.steps": 100})
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))  # A saved step: the config binds.
  config_path = os.path.join(workdir, "config.json")
  assert json.load(open(config_path))["train"]["steps"] == 100
  write_config(tmp_path, **{"train.steps": 100})  # Same config: nothing to record.
  assert not os.path.exists(os.path.join(workdir, "config.1.json"))

  write_config(tmp_path, **{"train.steps": 200})
  assert json.load(open(config_path))["train"]["steps"] == 200
  assert json.load(open(os.path.join(workdir, "config.1.json")))["train"]["steps"] == 100

  before = open(config_path).read()
  with pytest.raises(CheckpointError, match=r"model\.num_layers \(6 -> 2\)"):
    write_config(tmp_path, **{"train.steps": 200, "model.num_layers": 2})
  assert open(config_path).read() == before
  assert workdir_lib.read_run_config(workdir).train.steps == 200


def test_a_workdir_without_checkpoints_takes_another_model_and_keeps_the_old_config(tmp_path):
  """A run that failed before its first checkpoint left config.json: it binds nothing."""
  workdir = str(tmp_path)
  write_config(tmp_path, **{"model.d_model": 256})
  os.makedirs(os.path.join(workdir, "checkpoints", "20.orbax-checkpoint-tmp-1"))  # Unfinished.
  assert not workdir_lib.has_checkpoints(workdir)
  write_config(tmp_path, **{"model.d_model": 128})
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 128
  assert json.load(open(os.path.join(workdir, "config.1.json")))["model"]["d_model"] == 256


def test_a_workdir_without_checkpoints_keeps_its_vocabulary_only_for_the_same_data(tmp_path):
  workdir = str(tmp_path)
  write_config(tmp_path, **{"model.vocab_size": 8000})
  open(os.path.join(workdir, "vocab.model"), "wb").close()
  write_config(tmp_path, **{"model.vocab_size": 8000, "model.d_model": 128})  # Same vocabulary.
  before = open(os.path.join(workdir, "config.json")).read()
  for change in ({"model.vocab_size": 16000}, {"data.task": "copy"}):
    with pytest.raises(CheckpointError, match=r"vocab\.model was trained for other data: "
                       + next(iter(change)).replace(".", r"\.")):
      write_config(tmp_path, **{"model.vocab_size": 8000, **change})
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_check_can_write_refuses_a_file_and_a_read_only_place(tmp_path, monkeypatch):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    workdir_lib.check_can_write(str(a_file))
  with pytest.raises(workdir_lib.WorkdirError, match=r"cannot be created: .*a_file is a file"):
    workdir_lib.check_can_write(str(a_file / "run"))
  workdir_lib.check_can_write(str(tmp_path / "new" / "run"))  # Created later, by the run.
  assert not (tmp_path / "new").exists()
  # Permissions as a user without write access sees them (root writes anywhere).
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(workdir_lib.WorkdirError, match="cannot be written"):
    workdir_lib.check_can_write(str(tmp_path / "run"))


def test_storage_problem_finds_a_full_disk_in_the_errors_chain_and_nothing_else(tmp_path):
  full = OSError(28, "No space left on device", str(tmp_path / "vocab.model"))
  assert workdir_lib.storage_problem(full).startswith(
      f"no space left on device writing {tmp_path / 'vocab.model'} (")
  tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{tmp_path}/d/1f": Failed to '
                           "write 7711 bytes to file 11: No space left on device "
                           "[os_error_code='28']")
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError("the save failed") from e
  except RuntimeError as wrapped:
    assert workdir_lib.storage_problem(wrapped).startswith(
        f"no space left on device writing {tmp_path}/d/1f (")
  assert workdir_lib.storage_problem(OSError(30, "Read-only", "/x")).startswith(
      "read-only file system writing /x")
  assert workdir_lib.storage_problem(FileNotFoundError(2, "missing", "/x")) is None
  assert workdir_lib.storage_problem(ValueError("a bug")) is None
