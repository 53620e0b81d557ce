"""SentencePiece vocabulary: special ids, save/reload, round trips, train once per workdir."""

import os

import pytest

from jaxformer.data import sources, tokenizer
from jaxformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from jaxformer.errors import ConfigError, DataError


def test_special_ids_are_the_defined_ones(numbers_tokenizer):
  tok = numbers_tokenizer
  assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == [
      "<pad>", "<unk>", "<s>", "</s>"]
  assert len({PAD_ID, UNK_ID, BOS_ID, EOS_ID}) == 4 and PAD_ID == 0


def test_round_trip_on_the_default_task(numbers_tokenizer, numbers_data_dir, small_config):
  tok = numbers_tokenizer
  for split in ("train", "validation"):
    source = sources.get_split(small_config(), split, numbers_data_dir)
    for i in range(len(source)):
      for text in source[i].values():
        ids = tok.encode(text)
        assert ids and all(0 <= j < tok.vocab_size for j in ids)
        assert EOS_ID not in ids and BOS_ID not in ids and PAD_ID not in ids
        assert tok.decode(ids) == text
  assert UNK_ID not in tok.encode("novecientos noventa y nueve mil dieciséis veintiún")


def test_decode_stops_at_eos_and_skips_pad_and_bos(numbers_tokenizer):
  tok = numbers_tokenizer
  one, two = tok.encode("seven"), tok.encode("dos")
  assert tok.decode([BOS_ID] + one + [EOS_ID] + two + [PAD_ID]) == "seven"
  assert tok.decode(one + [PAD_ID, PAD_ID]) == "seven"
  assert tok.decode([EOS_ID] + one) == ""
  # An id past the vocabulary (the model's embedding may be larger) reads as unknown.
  assert tok.decode(one + [tok.vocab_size + 5] + two) == tok.decode(one + [UNK_ID] + two)


def test_saved_and_reloaded_vocabulary_gives_identical_ids(numbers_tokenizer, tmp_path):
  path = str(tmp_path / "copy.model")
  numbers_tokenizer.save(path)
  again = tokenizer.Tokenizer.load(path)
  assert again.vocab_size == numbers_tokenizer.vocab_size
  for text in ("three thousand four hundred twenty-one", "tres mil cuatrocientos veintiuno",
               "quinientos", "zero"):
    assert again.encode(text) == numbers_tokenizer.encode(text)
  assert [again.id_to_piece(i) for i in range(again.vocab_size)] == [
      numbers_tokenizer.id_to_piece(i) for i in range(again.vocab_size)]


def test_vocabulary_is_trained_once_per_workdir(numbers_workdir, small_config, monkeypatch):
  path = os.path.join(numbers_workdir, tokenizer.VOCAB_FILENAME)
  before = os.stat(path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("trained again although vocab.model exists")

  monkeypatch.setattr(tokenizer, "train", no_training)
  tok = tokenizer.load_or_train(small_config(), numbers_workdir)
  assert os.stat(path).st_mtime_ns == before and tok.vocab_size <= 128
  with pytest.raises(ConfigError, match=r"vocab\.model has \d+ pieces but model\.vocab_size=8"):
    config = small_config()
    config.model.vocab_size = 8
    tokenizer.load_or_train(config, numbers_workdir)


def test_vocabulary_sample_is_capped_both_sides_and_seeded(numbers_data_dir, small_config):
  source = sources.get_split(small_config(), "train", numbers_data_dir)
  sample = tokenizer.training_sentences(source, 101, seed=5)
  assert len(sample) == 101
  assert sample == tokenizer.training_sentences(source, 101, seed=5)
  assert sample != tokenizer.training_sentences(source, 101, seed=6)
  pairs = {(source[i]["source"], source[i]["target"]) for i in range(len(source))}
  assert all(pair in pairs for pair in zip(sample[0::2], sample[1::2]))


def test_other_processes_wait_for_process_0(tmp_path, small_config, monkeypatch):
  monkeypatch.setattr(tokenizer.jax, "process_index", lambda: 1)
  monkeypatch.setattr(sources, "WAIT_POLL_S", 0.01)
  monkeypatch.setattr(sources, "WAIT_TIMEOUT_S", 0.05)
  with pytest.raises(DataError, match=r"waiting for process 0 to write .*vocab\.model"):
    tokenizer.load_or_train(small_config(), str(tmp_path))
  assert not os.listdir(tmp_path), "a process other than 0 must not train or build data"


def test_damaged_vocabulary_is_a_data_error(tmp_path):
  path = tmp_path / "vocab.model"
  path.write_bytes(b"not a model")
  with pytest.raises(DataError, match=r"vocab\.model: not a SentencePiece model"):
    tokenizer.Tokenizer.load(str(path))
  with pytest.raises(DataError, match=r"missing\.model: vocabulary not found"):
    tokenizer.Tokenizer.load(str(tmp_path / "missing.model"))
