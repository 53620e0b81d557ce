"""SentencePiece, wrapped: train a vocabulary on sentences, load and save it, encode and decode.

A leaf: it knows nothing of datasets or workdirs (jaxformer.data.vocab decides when a run's
vocabulary is trained and on what). Every vocabulary puts the special tokens at the ids of
jaxformer.tokens, which the model, the loss and decoding rely on.

Two kinds of vocabulary file, both read by `Tokenizer.load`:
- a SentencePiece model (what jaxformer trains): one model, its own ids, for both sides;
- a Marian vocabulary (what `jaxformer import --format hf` writes): a zip archive of Marian's
  three files, `source.spm` and `target.spm` (two SentencePiece models: sources are cut into
  pieces by the first, targets by the second) and `vocab.json` (piece -> id, one id space for
  both sides, in jaxformer's order). `TwoSidedTokenizer` reads it. One file, so that a run's
  vocabulary stays the one path every command (and fine-tuning's copy) knows.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Iterable, Sequence

import sentencepiece as spm
from etils import epath

from jaxformer.errors import DataError
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPM_LOG_LEVEL = 2  # SentencePiece's own log: 0 info, 1 warnings, 2 errors only.


def text_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  """The ids of `ids` that are text: up to the first EOS, PAD and BOS skipped, ids past the
  vocabulary as UNK_ID (a model whose model.vocab_size exceeds the vocabulary may predict them)."""
  text = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      text.append(i if 0 <= i < vocab_size else UNK_ID)
  return text


class Tokenizer:
  """Text <-> ids with a SentencePiece model whose pad/unk/bos/eos ids are jaxformer.tokens'."""

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self._model_proto = model_proto
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    found = (self._processor.pad_id(), self._processor.unk_id(), self._processor.bos_id(),
             self._processor.eos_id())
    if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise DataError(f"{path}: special ids pad/unk/bos/eos are {found}, jaxformer needs "
                      f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train a new vocabulary (new workdir)")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece model file, or a Marian vocabulary (a local or gs:// path).
    DataError if it is missing or neither."""
    path = str(path)
    try:
      proto = epath.Path(path).read_bytes()
    except FileNotFoundError:
      raise DataError(f"{path}: vocabulary not found") from None
    if proto.startswith(ZIP_MAGIC):
      return TwoSidedTokenizer.from_bundle(proto, path)
    try:
      return cls(proto, path)
    except RuntimeError as e:
      raise DataError(f"{path}: not a SentencePiece model ({e})") from None

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to `path` (local or gs://) atomically: readers never see a
    half-written file."""
    path = epath.Path(path)
    partial = path.with_name(f"{path.name}.partial.{os.getpid()}")
    partial.write_bytes(self._model_proto)
    partial.replace(path)
    self.path = str(path)

  @property
  def vocab_size(self) -> int:
    """V: the number of ids, special tokens included."""
    return self._processor.get_piece_size()

  def id_to_piece(self, i: int) -> str:
    return self._processor.id_to_piece(int(i))

  def encode(self, text: str) -> list[int]:
    """The ids of a source sentence `text`, without BOS or EOS."""
    return self._processor.encode_as_ids(text)

  def encode_target(self, text: str) -> list[int]:
    """The ids of a target sentence `text`, without BOS or EOS (one model for both sides)."""
    return self.encode(text)

  def marian_files(self) -> tuple[bytes, bytes, list[str]]:
    """(source SentencePiece model, target model, the piece of every id): what a Marian
    tokenizer is made of (`source.spm`, `target.spm`, `vocab.json`)."""
    return (self._model_proto, self._model_proto,
            [self.id_to_piece(i) for i in range(self.vocab_size)])

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS; PAD and BOS are skipped (so a padded row decodes).

    Ids past the vocabulary (a model whose model.vocab_size exceeds vocab_size may predict
    them) decode like UNK_ID, as " ⁇ ".
    """
    return self._processor.decode_ids(text_ids(ids, self.vocab_size))


ZIP_MAGIC = b"PK\x03\x04"  # how a zip archive starts (a SentencePiece model cannot).
BUNDLE_FILES = ("source.spm", "target.spm", "vocab.json")  # Marian's own names.
BUNDLE_DATE = (1980, 1, 1, 0, 0, 0)  # zip entries' fixed time: equal vocabularies, equal bytes.


def bundle(source_model: bytes, target_model: bytes, pieces: Sequence[str]) -> bytes:
  """A Marian vocabulary file: `pieces[i]` is the piece of id i."""
  out = io.BytesIO()
  vocab = json.dumps({piece: i for i, piece in enumerate(pieces)}, ensure_ascii=False, indent=1)
  with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, data in zip(BUNDLE_FILES, (source_model, target_model, vocab.encode("utf-8"))):
      archive.writestr(zipfile.ZipInfo(name, BUNDLE_DATE), data)
  return out.getvalue()


def split_language_code(text: str) -> tuple[list[str], str]:
  """'>>fr<< text' -> (['>>fr<<'], ' text'): a multilingual Marian model's target-language
  token, which is a piece of its own, not cut by SentencePiece (as MarianTokenizer does)."""
  end = text.find("<<")
  if text.startswith(">>") and end != -1:
    return [text[:end + 2]], text[end + 2:]
  return [], text


class TwoSidedTokenizer(Tokenizer):
  """A Marian vocabulary: sources cut into pieces by one SentencePiece model, targets by
  another, every piece mapped to an id of one shared table (an unknown piece to UNK_ID).

  The ids are the table's, not the SentencePiece models' own; the import put PAD, UNK, BOS and
  EOS at jaxformer's ids.
  """

  def __init__(self, source_model: bytes, target_model: bytes, pieces: Sequence[str],
               path: str = "<memory>"):
    self._source = spm.SentencePieceProcessor(model_proto=source_model)
    self._target = spm.SentencePieceProcessor(model_proto=target_model)
    self._pieces = list(pieces)
    self._ids = {piece: i for i, piece in enumerate(self._pieces)}
    self._files = (source_model, target_model)
    self._model_proto = bundle(source_model, target_model, pieces)  # what `save` writes.
    self.path = path

  @classmethod
  def from_bundle(cls, data: bytes, path: str) -> TwoSidedTokenizer:
    """Reads what `bundle` wrote. DataError when it is not a Marian vocabulary."""
    try:
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        source, target, vocab = (archive.read(name) for name in BUNDLE_FILES)
      ids = json.loads(vocab)
      pieces = sorted(ids, key=ids.get)
      if [ids[p] for p in pieces] != list(range(len(pieces))):
        raise ValueError("vocab.json's ids are not 0, 1, ..., V-1")
      return cls(source, target, pieces, path)
    except (zipfile.BadZipFile, KeyError, ValueError, RuntimeError) as e:
      raise DataError(f"{path}: not a Marian vocabulary ({e})") from None

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  def _ids_of(self, pieces: Iterable[str]) -> list[int]:
    return [self._ids.get(piece, UNK_ID) for piece in pieces]

  def encode(self, text: str) -> list[int]:
    code, text = split_language_code(text)
    return self._ids_of(code + self._source.encode_as_pieces(text))

  def encode_target(self, text: str) -> list[int]:
    return self._ids_of(self._target.encode_as_pieces(text))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of target `ids` up to the first EOS, PAD and BOS skipped, by the target model."""
    return self._target.decode_pieces([self._pieces[i] for i in text_ids(ids, self.vocab_size)])

  def marian_files(self) -> tuple[bytes, bytes, list[str]]:
    return (*self._files, list(self._pieces))


def train(sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
          character_coverage: float = 1.0) -> Tokenizer:
  """Trains a SentencePiece model on `sentences` (kept in memory, not written).

  `vocab_size` is an upper bound: a small corpus (e.g. the digits of the algorithmic tasks)
  gives fewer pieces rather than an error.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        hard_vocab_limit=False, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        minloglevel=SPM_LOG_LEVEL)
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed: {e}") from None
  return Tokenizer(model.getvalue())
