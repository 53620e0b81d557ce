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
