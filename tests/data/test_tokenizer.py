"""SentencePiece wrapper: special ids, save/reload, round trips, damaged files."""

import pytest

from jaxformer.data import sources, tokenizer
from jaxformer.errors import DataError
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID


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


def test_damaged_vocabulary_is_a_data_error(tmp_path):
  path = tmp_path / "vocab.model"
  path.write_bytes(b"not a model")
  with pytest.raises(DataError, match=r"vocab\.model: not a SentencePiece model"):
    tokenizer.Tokenizer.load(str(path))
  with pytest.raises(DataError, match=r"missing\.model: vocabulary not found"):
    tokenizer.Tokenizer.load(str(tmp_path / "missing.model"))


def test_a_marian_vocabulary_maps_each_side_s_pieces_through_one_table(numbers_tokenizer,
                                                                        tmp_path):
  source, _, pieces = numbers_tokenizer.marian_files()
  pieces = pieces + [">>es<<"]  # a multilingual model's target-language token.
  two_sided = tokenizer.TwoSidedTokenizer(source, source, pieces)
  path = tmp_path / "vocab.model"
  two_sided.save(str(path))
  again = tokenizer.Tokenizer.load(str(path))
  assert isinstance(again, tokenizer.TwoSidedTokenizer) and again.vocab_size == len(pieces)
  text = "three thousand four hundred twenty-one"
  assert again.encode(text) == again.encode_target(text) == numbers_tokenizer.encode(text)
  assert again.encode(">>es<<" + text) == [len(pieces) - 1] + numbers_tokenizer.encode(text)
  assert again.decode(numbers_tokenizer.encode(text) + [EOS_ID, 5]) == text
