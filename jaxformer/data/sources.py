"""Where sentence pairs come from: tfds datasets read as random-access sources, without TensorFlow.

Three kinds of data, chosen by `data.task`, all ending up as tfds datasets in array_record files
that `builder.as_data_source()` reads with random access (what grain needs to shuffle globally
and to shard by index):

- generated tasks ('numbers', 'numbers_es_en', 'copy', 'reverse', 'sort', 'addition'):
  `GeneratedTask`, a `tfds.core.GeneratorBasedBuilder` that draws the splits of
  jaxformer/data/tasks.py (its features and examples come from `PairBuilder`, the base it shares
  with `TextPairs`);
- local parallel text ('text'): `TextPairs`, a builder over aligned `*.src` / `*.tgt` files or a
  TSV file per split, checked line by line;
- catalog datasets ('tfds'): e.g. `wmt14_translate/de-en`, prepared once by
  `jaxformer prepare` (needs internet), then read like the others.

A builder's config name records everything its data depends on (task, seed, sizes, lengths; or
the paths, sizes and modification times of the text files), so a changed config builds a new
dataset beside the old one instead of silently reusing stale data.

Every source, whatever its kind, reads as `source[i] -> {'source': str, 'target': str}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import runpy
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import tensorflow_datasets as tfds

from jaxformer import config as config_lib
from jaxformer.data import tasks, text
from jaxformer.errors import ConfigError, DataError
from jaxformer.log import absl_warnings_off

SPLITS = ("train", "validation", "test")
FILE_FORMAT = "array_record"   # random access, readable without TensorFlow.
WAIT_TIMEOUT_S = 2 * 3600      # how long other processes wait for process 0 to build data/vocab.
WAIT_POLL_S = 1.0
# Modules that register the catalog datasets jaxformer knows how to read.
CATALOG_MODULES = {
    "wmt14_translate": "tensorflow_datasets.translate.wmt14",
    "wmt17_translate": "tensorflow_datasets.translate.wmt17",
}

Config = ml_collections.ConfigDict | ml_collections.FrozenConfigDict

if __name__ == "__main__":
  # The old way to prepare an experiment's data, kept working. It hands over before the builders
  # below are defined: `jaxformer prepare` imports this module again, and tfds registers each
  # builder name once.
  print("note: `python -m jaxformer.data.sources` is now `jaxformer prepare`", file=sys.stderr)
  sys.argv[1:1] = ["prepare"]
  runpy.run_module("jaxformer", run_name="__main__")
  raise SystemExit(0)


def shuffle_seed(config: Config) -> int:
  """The seed of the data: `data.shuffle_seed`, or `train.seed` when that is negative."""
  return config.data.shuffle_seed if config.data.shuffle_seed >= 0 else config.train.seed


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
  """Polls `ready()` until it is true; raises DataError naming `what` after `timeout_s`
  (default WAIT_TIMEOUT_S)."""
  timeout_s = WAIT_TIMEOUT_S if timeout_s is None else timeout_s
  deadline = time.monotonic() + timeout_s
  while not ready():
    if time.monotonic() > deadline:
      raise DataError(f"timed out after {timeout_s:.0f} s waiting for process 0 to write {what}; "
                      "check process 0's log, and that every process sees the same workdir "
                      "(and data.data_dir)")
    time.sleep(WAIT_POLL_S)


# --- Random-access sources of {'source': str, 'target': str}. -------------------------------

def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


class PairSource(Sequence[dict[str, str]]):
  """A tfds data source seen as pairs: `len(source)`, `source[i] -> {'source', 'target'}`.

  Args:
    records: a random-access tfds data source (`builder.as_data_source(split)`).
    source_key, target_key: the record features holding the two sides ('en' and 'de' for WMT).
  """

  def __init__(self, records: Sequence[Any], source_key: str = "source",
               target_key: str = "target"):
    self._records = records
    self._source_key = source_key
    self._target_key = target_key

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, str]:
    if not 0 <= index < len(self):
      raise IndexError(f"pair {index} is outside 0..{len(self) - 1}")
    record = self._records[index]
    return {"source": _text(record[self._source_key]),
            "target": _text(record[self._target_key])}

  def __repr__(self) -> str:
    return f"PairSource({self._records!r}, {self._source_key!r} -> {self._target_key!r})"


_PAIR_FEATURES = {"source": tfds.features.Text(), "target": tfds.features.Text()}


class PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of sentence pairs, example i of a split being its pair i (never shuffled).

  The base of `GeneratedTask` and `TextPairs`, which say where each split's pairs come from
  (`_split_generators`). Not a dataset itself, so not registered with tfds.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict(_PAIR_FEATURES))

  def _generate_examples(self, pairs):
    for index, (source, target) in enumerate(pairs):
      yield index, {"source": source, "target": target}


# --- Generated tasks. ------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
  """What a generated dataset depends on; `GeneratedTask.config_for` names it after all of it."""
  task: str = "numbers"
  sizes: tuple[int, int, int] = (0, 0, 0)                  # train, validation, test
  train_lengths: tuple[int, int] = (1, 8)
  eval_lengths: tuple[int, int] = (1, 8)
  seed: int = 0


class GeneratedTask(PairBuilder):
  """The generated tasks of jaxformer/data/tasks.py as a tfds dataset."""

  # Bump the version whenever tasks.py draws different pairs, so older data is never reused.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Numbers (English -> Spanish words), copy, reverse, sort, addition."}

  @staticmethod
  def config_for(config: Config) -> TaskConfig:
    d = config.data  # config.validate checked the sizes and the length ranges.
    sizes = (d.num_train, d.num_validation, d.num_test)
    seed = shuffle_seed(config)
    name = f"{d.task}-seed{seed}-sizes{'_'.join(map(str, sizes))}"
    if d.task in tasks.ALGORITHMIC_TASKS:  # 'numbers' does not use the lengths.
      name += f"-len{d.train_lengths[0]}_{d.train_lengths[1]}"
      name += f"-evallen{d.eval_lengths[0]}_{d.eval_lengths[1]}"
    return TaskConfig(name=name, task=d.task, sizes=sizes, train_lengths=tuple(d.train_lengths),
                      eval_lengths=tuple(d.eval_lengths), seed=seed)

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    splits = tasks.generate_splits(
        c.task, dict(zip(SPLITS, c.sizes)),
        {"train": c.train_lengths, "validation": c.eval_lengths, "test": c.eval_lengths}, c.seed)
    return {split: self._generate_examples(pairs) for split, pairs in splits.items()}


# --- Local parallel text. --------------------------------------------------------------------

def read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file, as jaxformer.data.text splits them (at "\\n" only).
  DataError naming file and line."""
  lines = text.read_lines(path, DataError)
  if not "".join(lines).strip():
    raise DataError(f"{path}: the file is empty")
  return lines


def read_pairs(paths: Sequence[str]) -> list[tuple[str, str]]:
  """Aligned pairs from ('x.src', 'x.tgt') or ('x.tsv',). DataError naming file and line."""
  if len(paths) == 1:
    pairs = []
    for number, line in enumerate(read_lines(paths[0]), start=1):
      fields = line.split("\t")
      if len(fields) != 2:
        raise DataError(f"{paths[0]}:{number}: expected 2 tab-separated fields (source, target), "
                        f"found {len(fields)}")
      pairs.append((fields[0], fields[1]))
  else:
    sources, targets = (read_lines(p) for p in paths)
    if len(sources) != len(targets):
      shorter, longer = sorted(zip((len(sources), len(targets)), paths))
      raise DataError(f"{shorter[1]} has {shorter[0]} lines but {longer[1]} has {longer[0]}: "
                      f"line {shorter[0] + 1} of {longer[1]} has no partner; the files must be "
                      "aligned line by line")
    pairs = list(zip(sources, targets))
  for number, (source, target) in enumerate(pairs, start=1):
    for side, sentence, path in (("source", source, paths[0]), ("target", target, paths[-1])):
      if not sentence.strip():
        raise DataError(f"{path}:{number}: empty {side} sentence; remove the pair or fill it in")
  return pairs


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
  """Which files make each split; `TextPairs.config_for` names it after their content stamps."""
  files: tuple[tuple[str, tuple[str, ...]], ...] = ()     # ((split, paths), ...)


def _file_stamp(path: str) -> str:
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


class TextPairs(PairBuilder):
  """Aligned sentence pairs from local files, one split per `data.<split>_files` key.

  Example i of a split is line i + 1 of its files.
  """

  # Bump the version whenever reading the files gives different pairs (jaxformer.data.text).
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Aligned .src/.tgt files or a .tsv file per split.",
                   "1.1.0": "A UTF-8 byte-order mark at the start of a file is not text."}

  @staticmethod
  def config_for(config: Config) -> TextConfig:
    # config.validate checked the form of each value, and that train and validation have one.
    files = tuple((split, config_lib.text_file_paths(config.data[f"{split}_files"], key))
                  for split, key in config_lib.TEXT_FILES.items() if config.data[f"{split}_files"])
    stamps = "\n".join(f"{split}={_file_stamp(p)}" for split, paths in files for p in paths)
    digest = hashlib.sha256(stamps.encode()).hexdigest()[:16]
    return TextConfig(name=f"text-{digest}", files=files)

  def _split_generators(self, dl_manager):
    del dl_manager
    # Read (and check) every file before writing anything.
    pairs = {split: read_pairs(paths) for split, paths in self.builder_config.files}
    return {split: self._generate_examples(split_pairs) for split, split_pairs in pairs.items()}


# --- Catalog datasets (WMT). -----------------------------------------------------------------

def catalog_builder(config: Config, data_dir: str) -> tfds.core.DatasetBuilder:
  """The tfds builder of `data.tfds_name` (e.g. 'wmt14_translate/de-en') in `data_dir`."""
  name = config.data.tfds_name
  module = CATALOG_MODULES.get(name.split("/")[0].split(":")[0])
  if module:
    importlib.import_module(module)  # Registers the builder; needs no TensorFlow.
  try:
    with absl_warnings_off():
      return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"data.tfds_name={name!r} is not in the tfds catalog; jaxformer is tested "
                      f"with {', '.join(k + '/de-en' for k in CATALOG_MODULES)}") from None


def direction_keys(config: Config, builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """'en-de' -> ('en', 'de'): the record features of the source and target languages."""
  languages = tuple(builder.info.features.keys())
  parts = config.data.direction.split("-")
  if len(parts) != 2 or any(p not in languages for p in parts) or parts[0] == parts[1]:
    options = [f"{a}-{b}" for a in languages for b in languages if a != b]
    raise ConfigError(f"data.direction={config.data.direction!r} does not fit "
                      f"{config.data.tfds_name}; choose one of {', '.join(options)}")
  return parts[0], parts[1]


def _not_prepared(config: Config, data_dir: str) -> DataError:
  return DataError(
      f"{config.data.tfds_name} is not prepared in {data_dir}; download and prepare it once "
      "(needs internet): jaxformer prepare --config <experiment> --workdir <workdir>")


# --- Building and opening. -------------------------------------------------------------------

def local_builder(config: Config, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """The builder of a generated task or of local text files (not yet prepared)."""
  if config.data.task == "text":
    with absl_warnings_off():
      return TextPairs(data_dir=data_dir, config=TextPairs.config_for(config))
  if config.data.task in tasks.SAMPLERS:
    with absl_warnings_off():
      return GeneratedTask(data_dir=data_dir, config=GeneratedTask.config_for(config))
  raise ConfigError(f"data.task={config.data.task!r} is not a generated or text task")


def prepare(config: Config, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the dataset of `config` in `data_dir` unless it exists; returns its builder.

  Generated tasks and text files take seconds. A catalog dataset is downloaded (hours for
  WMT); run this once on one machine with internet, before training.
  """
  if config.data.task == "tfds":
    builder = catalog_builder(config, data_dir)
    direction_keys(config, builder)
    tfds.display_progress_bar(True)
  else:
    builder = local_builder(config, data_dir)
    tfds.display_progress_bar(False)  # Seconds of work: no progress bars in the log.
  with absl_warnings_off():
    prepared = builder.is_prepared()
  if not prepared:
    try:
      builder.download_and_prepare(file_format=FILE_FORMAT)
    except OSError as e:  # Network failures (requests.ConnectionError) and full disks are.
      raise DataError(f"preparing {builder.name}/{builder.builder_config_name} in {data_dir} "
                      f"failed: {e}; check the internet connection and free disk space, then "
                      "run the same command again (finished downloads are kept)") from e
  return builder


def check_ready(config: Config, data_dir: str) -> None:
  """Checks, writing nothing, that the data of a run can be had; called before a run writes.

  - 'tfds': the catalog dataset is prepared in `data_dir` (training never downloads it) and
    data.direction fits its languages;
  - 'text': every file of every split exists and holds aligned UTF-8 pairs, unless the dataset
    was already built from these files (process 0 reads them; the others wait for its build);
  - generated tasks: nothing to read (config.validate checked the sizes and lengths).
  Raises ConfigError or DataError naming the key or the file (and line).
  """
  if config.data.task == "tfds":
    builder = catalog_builder(config, data_dir)
    direction_keys(config, builder)
    with absl_warnings_off():
      if not builder.is_prepared():
        raise _not_prepared(config, data_dir)
  elif config.data.task == "text" and jax.process_index() == 0:
    builder = local_builder(config, data_dir)  # Finds every file (their stamps name the data).
    with absl_warnings_off():
      prepared = builder.is_prepared()
    if not prepared:
      for _, paths in builder.builder_config.files:
        read_pairs(paths)


def _open_local(config: Config, data_dir: str) -> tfds.core.DatasetBuilder:
  """Process 0 builds the data once; the other processes wait for it."""
  if jax.process_index() == 0:
    return prepare(config, data_dir)
  builder = local_builder(config, data_dir)
  wait_until(builder.is_prepared, f"the {config.data.task} dataset in {builder.data_dir}")
  return builder


def get_split(config: Config, split: str, data_dir: str) -> PairSource:
  """The pairs of one split ('train', 'validation' or 'test') of the configured data.

  Generated and text datasets are built on first use (by process 0); catalog datasets must have
  been prepared with `prepare` (`jaxformer prepare`).

  Returns:
    a random-access source: `len(source)`, `source[i] -> {'source': str, 'target': str}`.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
  if config.data.task == "text" and not config.data[f"{split}_files"]:
    raise ConfigError(f"data.{split}_files is empty; set it to '<src>,<tgt>' or '<file>.tsv' "
                      f"to use the {split} split")
  if config.data.task != "tfds":
    return PairSource(_open_local(config, data_dir).as_data_source(split=split))
  builder = catalog_builder(config, data_dir)
  source_key, target_key = direction_keys(config, builder)
  try:
    records = builder.as_data_source(split=split)
  except (NotImplementedError, FileNotFoundError, ValueError, KeyError) as e:
    if not builder.is_prepared():
      raise _not_prepared(config, data_dir) from None
    raise DataError(f"{config.data.tfds_name} split {split!r} in {builder.data_dir} cannot be "
                    f"read as {FILE_FORMAT}: {e}") from None
  return PairSource(records, source_key, target_key)

