"""The vocabulary of a run: trained once per workdir, capped and seeded sample, one trainer."""

import os

import pytest

from jaxformer import workdir as workdir_lib
from jaxformer.data import sources, tokenizer, vocab
from jaxformer.errors import ConfigError, DataError


def test_vocabulary_is_trained_once_per_workdir(numbers_workdir, small_config, monkeypatch):
  path = os.path.join(numbers_workdir, workdir_lib.VOCAB_FILE)
  before = os.stat(path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("trained again although vocab.model exists")

  monkeypatch.setattr(tokenizer, "train", no_training)
  tok = vocab.load_or_train(small_config(), numbers_workdir)
  assert os.stat(path).st_mtime_ns == before and tok.vocab_size <= 128
  with pytest.raises(ConfigError, match=r"vocab\.model has \d+ pieces but model\.vocab_size=8"):
    config = small_config()
    config.model.vocab_size = 8
    vocab.load_or_train(config, numbers_workdir)


def test_vocabulary_sample_is_capped_both_sides_and_seeded(numbers_data_dir, small_config):
  source = sources.get_split(small_config(), "train", numbers_data_dir)
  sample = vocab.training_sentences(source, 101, seed=5)
  assert len(sample) == 101
  assert sample == vocab.training_sentences(source, 101, seed=5)
  assert sample != vocab.training_sentences(source, 101, seed=6)
  pairs = {(source[i]["source"], source[i]["target"]) for i in range(len(source))}
  assert all(pair in pairs for pair in zip(sample[0::2], sample[1::2]))


def test_other_processes_wait_for_process_0(tmp_path, small_config, monkeypatch):
  monkeypatch.setattr(vocab.jax, "process_index", lambda: 1)
  monkeypatch.setattr(sources, "WAIT_POLL_S", 0.01)
  monkeypatch.setattr(sources, "WAIT_TIMEOUT_S", 0.05)
  with pytest.raises(DataError, match=r"waiting for process 0 to write .*vocab\.model"):
    vocab.load_or_train(small_config(), str(tmp_path))
  assert not os.listdir(tmp_path), "a process other than 0 must not train or build data"
