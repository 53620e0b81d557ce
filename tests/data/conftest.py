"""Shared fixtures of the data tests: a small numbers task and its vocabulary, built once."""

import pytest

from jaxformer import workdir as workdir_lib
from jaxformer.config import get_default_config
from jaxformer.data import vocab


def small_config(**data_overrides):
  """The default config with a small numbers task: 600 / 60 / 60 pairs, rows of 24 tokens."""
  config = get_default_config()
  config.data.num_train = 600
  config.data.num_validation = 60
  config.data.num_test = 60
  config.data.max_len = 24
  config.model.vocab_size = 128
  config.train.batch_size = 8
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


@pytest.fixture(name="small_config", scope="session")
def small_config_fixture():
  """The factory `small_config(**data_overrides)`, for tests."""
  return small_config


@pytest.fixture(scope="session")
def numbers_workdir(tmp_path_factory):
  """A workdir holding the small numbers dataset (workdir/tfds) and its vocab.model."""
  workdir = str(tmp_path_factory.mktemp("numbers"))
  vocab.load_or_train(small_config(), workdir)
  return workdir


@pytest.fixture(scope="session")
def numbers_tokenizer(numbers_workdir):
  return vocab.load_or_train(small_config(), numbers_workdir)


@pytest.fixture(scope="session")
def numbers_data_dir(numbers_workdir):
  return workdir_lib.resolve_data_dir(small_config(), numbers_workdir)
