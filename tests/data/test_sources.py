"""tfds sources: generated splits, local text files and their errors, WMT under mock_data."""

import os

import pytest
import tensorflow_datasets as tfds

from jaxformer.data import sources
from jaxformer.errors import ConfigError, DataError


def read_split(config, split, data_dir):
  source = sources.get_split(config, split, data_dir)
  return [(source[i]["source"], source[i]["target"]) for i in range(len(source))]


@pytest.mark.parametrize("task", ["numbers", "reverse"])
def test_generated_splits_identical_across_builds_and_disjoint(task, small_config, tmp_path):
  config = small_config(task=task, num_train=200, num_validation=30, num_test=20,
                        eval_lengths=(3, 9))
  first = {s: read_split(config, s, str(tmp_path / "a")) for s in sources.SPLITS}
  second = {s: read_split(config, s, str(tmp_path / "b")) for s in sources.SPLITS}
  assert first == second
  assert [len(first[s]) for s in sources.SPLITS] == [200, 30, 20]
  seen = [pair[0] for s in sources.SPLITS for pair in first[s]]
  assert len(set(seen)) == len(seen), "a source appears twice (within or across splits)"
  assert all(isinstance(text, str) and text for s in first for pair in first[s] for text in pair)


def test_changed_config_builds_new_data_instead_of_reusing(small_config, tmp_path):
  config = small_config(num_train=100, num_validation=10, num_test=10)
  base = read_split(config, "train", str(tmp_path))
  config.train.seed = 1
  assert read_split(config, "train", str(tmp_path)) != base
  config.data.num_train = 120
  assert len(read_split(config, "train", str(tmp_path))) == 120
  config.data.shuffle_seed = 0  # The data seed is data.shuffle_seed when >= 0: seed 0 again.
  config.data.num_train = 100
  assert read_split(config, "train", str(tmp_path)) == base


# --- Local text files. -----------------------------------------------------------------------

SOURCES = ["The cat sleeps.", "Ünïcödé ß café", "a\tb is not a tab problem in .src files",
           "Last line."]
TARGETS = ["Die Katze schläft.", "Unicode", "kein Problem", "Letzte Zeile."]


def write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def text_config(small_config, **files):
  config = small_config(task="text")
  for split, spec in files.items():
    config.data[f"{split}_files"] = spec
  return config


def test_aligned_files_load_exactly(small_config, tmp_path):
  src = write(tmp_path / "a.src", "\n".join(SOURCES).encode() + b"\n")
  tgt = write(tmp_path / "a.tgt", "\r\n".join(TARGETS).encode())  # CRLF, no final newline
  tsv_lines = [f"{s.replace(chr(9), ' ')}\t{t}" for s, t in zip(SOURCES, TARGETS)]
  tsv = write(tmp_path / "v.tsv", "\n".join(tsv_lines).encode() + b"\n")
  config = text_config(small_config, train=f"{src},{tgt}", validation=tsv)
  assert read_split(config, "train", str(tmp_path / "tfds")) == list(zip(SOURCES, TARGETS))
  assert read_split(config, "validation", str(tmp_path / "tfds")) == [
      (s.replace("\t", " "), t) for s, t in zip(SOURCES, TARGETS)]
  with pytest.raises(ConfigError, match=r"data\.test_files is empty"):
    sources.get_split(config, "test", str(tmp_path / "tfds"))


def test_text_files_split_at_newline_only_without_the_byte_order_mark(small_config, tmp_path):
  """The lines of jaxformer.data.text: a separator inside a line stays in it (str.splitlines
  would break there and misalign the pairs), and Notepad's byte-order mark is no text."""
  sources_text = ["one\u2028two", "form\x0cfeed", "next\x85line"]
  src = write(tmp_path / "a.src", b"\xef\xbb\xbf" + "\n".join(sources_text).encode())
  tgt = write(tmp_path / "a.tgt", b"\xef\xbb\xbfuno\r\ndos\r\ntres\r\n")
  config = text_config(small_config, train=f"{src},{tgt}")
  assert read_split(config, "train", str(tmp_path / "tfds")) == list(
      zip(sources_text, ["uno", "dos", "tres"]))
  bom_only = write(tmp_path / "b.src", b"\xef\xbb\xbf\n")
  with pytest.raises(DataError, match=r"b\.src: the file is empty"):
    sources.read_lines(bom_only)


def test_edited_file_is_read_again(small_config, tmp_path):
  src = write(tmp_path / "a.src", b"one\ntwo\n")
  tgt = write(tmp_path / "a.tgt", b"uno\ndos\n")
  config = text_config(small_config, train=f"{src},{tgt}")
  assert read_split(config, "train", str(tmp_path / "tfds"))[1] == ("two", "dos")
  write(tmp_path / "a.tgt", b"uno\nDOS\n")
  os.utime(tgt, ns=(1, 1))  # A different modification time, whatever the clock resolution.
  assert read_split(config, "train", str(tmp_path / "tfds"))[1] == ("two", "DOS")


@pytest.mark.parametrize("src,tgt,bad_file,match", [
    (b"a\nb\nc\n", b"x\ny\n", "a.tgt", r"a\.tgt has 2 lines but .*a\.src has 3: line 3 of"),
    (b"a\nb\n", b"x\n\xff\xfe\n", "a.tgt", r"a\.tgt:2: invalid UTF-8"),
    (b"", b"", "a.src", r"a\.src: the file is empty"),
    (b"a\n\nc\n", b"x\ny\nz\n", "a.src", r"a\.src:2: empty source sentence"),
])
def test_bad_files_name_file_and_line(small_config, tmp_path, src, tgt, bad_file, match):
  paths = write(tmp_path / "a.src", src), write(tmp_path / "a.tgt", tgt)
  config = text_config(small_config, train=",".join(paths))
  with pytest.raises(DataError, match=match) as error:
    sources.get_split(config, "train", str(tmp_path / "tfds"))
  assert str(tmp_path / bad_file) in str(error.value)


def test_missing_file_and_bad_tsv(small_config, tmp_path):
  missing = str(tmp_path / "missing.src")
  tgt = write(tmp_path / "a.tgt", b"x\n")
  config = text_config(small_config, train=f"{missing},{tgt}")
  with pytest.raises(DataError, match=rf"{missing}: file not found"):
    sources.get_split(config, "train", str(tmp_path / "tfds"))
  tsv = write(tmp_path / "a.tsv", b"a\tb\nno tab here\n")
  config = text_config(small_config, train=tsv)
  with pytest.raises(DataError, match=rf"{tsv}:2: expected 2 tab-separated fields"):
    sources.get_split(config, "train", str(tmp_path / "tfds"))
  config = text_config(small_config, train=str(tmp_path / "a.txt"))
  with pytest.raises(ConfigError, match=r"data\.train_files=.* must be"):
    sources.get_split(config, "train", str(tmp_path / "tfds"))


def test_shipped_sample_files_load():
  from jaxformer import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config("text_files")
  for split in sources.SPLITS:
    paths = config_lib.text_file_paths(config.data[f"{split}_files"], f"data.{split}_files")
    assert all(os.path.isfile(p) for p in paths), paths
    pairs = sources.read_pairs(paths)
    assert len(pairs) >= 50


# --- Catalog (WMT) under tfds.testing.mock_data. ----------------------------------------------

@pytest.mark.parametrize("name", ["wmt14_translate/de-en", "wmt17_translate/de-en"])
@pytest.mark.parametrize("direction", ["en-de", "de-en"])
def test_wmt_direction_under_mock_data(small_config, tmp_path, name, direction):
  config = small_config(task="tfds", tfds_name=name, direction=direction)
  source_lang, target_lang = direction.split("-")
  with tfds.testing.mock_data(num_examples=5):
    pairs = read_split(config, "train", str(tmp_path))
    records = tfds.data_source(name, split="train")
    expected = [(records[i][source_lang], records[i][target_lang]) for i in range(5)]
  assert [(_str(s), _str(t)) for s, t in expected] == pairs


def _str(text):
  return text.decode() if isinstance(text, bytes) else text


def test_wmt_bad_direction_and_unprepared_data(small_config, tmp_path):
  config = small_config(task="tfds", direction="en-fr")
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ConfigError, match=r"data\.direction='en-fr' does not fit .*de-en, en-de"):
      sources.get_split(config, "train", str(tmp_path))
  config = small_config(task="tfds", tfds_name="wmt99_translate/de-en")
  with pytest.raises(ConfigError, match=r"data\.tfds_name='wmt99_translate/de-en' is not in"):
    sources.get_split(config, "train", str(tmp_path))
  config = small_config(task="tfds")
  with pytest.raises(DataError, match=r"wmt14_translate/de-en is not prepared in .*"
                                      r"jaxformer prepare"):
    sources.get_split(config, "train", str(tmp_path))
  assert not os.listdir(tmp_path), "reading must not create or download anything"


def test_other_processes_wait_for_process_0_to_build(small_config, tmp_path, monkeypatch):
  monkeypatch.setattr(sources.jax, "process_index", lambda: 1)
  monkeypatch.setattr(sources, "WAIT_POLL_S", 0.01)
  monkeypatch.setattr(sources, "WAIT_TIMEOUT_S", 0.05)
  with pytest.raises(DataError, match=r"waiting for process 0 to write the numbers dataset in"):
    sources.get_split(small_config(), "train", str(tmp_path))
  assert not any(files for _, _, files in os.walk(tmp_path)), "only process 0 builds data"
