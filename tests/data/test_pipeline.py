"""The grain pipelines: packing, host shards, resume, length policy, evaluation batches, WMT."""

import collections
import itertools
import json
import logging
import math
import time

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, sources, vocab
from jaxformer.errors import ConfigError, DataError
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID

KEYS = {"inputs", "targets", "inputs_segment_ids", "targets_segment_ids", "inputs_positions",
        "targets_positions"}


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def segments(batches):
  """Every packed pair of the batches as (input ids, target ids) tuples, checking row layout."""
  pairs = []
  for batch in batches:
    for row in range(batch["inputs"].shape[0]):
      row_pairs = {}
      for f in pipeline.FEATURES:
        ids, seg, pos = (batch[k][row] for k in (f, f"{f}_segment_ids", f"{f}_positions"))
        used = seg > 0
        # Pairs fill the row from the left, numbered 1, 2, ... in order; padding after them.
        assert np.all(used[:used.sum()]) and not np.any(used[used.sum():])
        assert np.all(ids[~used] == PAD_ID) and np.all(pos[~used] == 0)
        assert np.all(np.diff(seg[used]) >= 0) and (not used.any() or seg[0] == 1)
        for s in np.unique(seg[used]):
          in_segment = seg == s
          # Positions restart at 0 for every pair; each pair ends with EOS.
          np.testing.assert_array_equal(pos[in_segment], np.arange(in_segment.sum()))
          assert ids[in_segment][-1] == EOS_ID
          row_pairs.setdefault(s, []).append(tuple(ids[in_segment].tolist()))
      # Source and target of a pair are in the same row with the same segment id.
      assert all(len(sides) == 2 for sides in row_pairs.values())
      pairs.extend(tuple(sides) for _, sides in sorted(row_pairs.items()))
  return pairs


def stream(config, tok, data_dir, index=0, count=1):
  """Tokenized pairs of a process's shard in pipeline order, computed without the pipeline's
  later steps: (input ids, target ids, epoch)."""
  source = sources.get_split(config, "train", data_dir)
  shard = pipeline.train_shard(source, sources.shuffle_seed(config), index, count)
  for i in itertools.count():
    pair = shard[i]
    ids = pipeline.tokenize(tok, pair)
    yield tuple(ids["inputs"].tolist()), tuple(ids["targets"].tolist()), pair["epoch"]


# --- Packing. --------------------------------------------------------------------------------

def test_packing_keeps_every_token_of_every_pair_exactly_once():
  rng = np.random.default_rng(0)
  max_len, pairs = 16, []
  for k in range(200):
    n_in, n_out = rng.integers(1, max_len + 1, size=2)
    # Distinct token values per pair, so any lost, repeated or moved token is seen.
    pairs.append({"inputs": np.arange(n_in, dtype=np.int32) + 1000 * k + 1,
                  "targets": np.arange(n_out, dtype=np.int32) + 1000 * k + 500})
  ds = grain.MapDataset.source(pairs).to_iter_dataset()
  rows = list(pipeline.to_rows(ds, max_len, packing=True, num_packing_bins=4))
  assert len(rows) < len(pairs), "nothing was packed"
  packed = collections.Counter()
  for row in rows:
    for f in pipeline.FEATURES:
      assert row[f].shape == (max_len,) and row[f].dtype == np.int32
    seg_in, seg_out = row["inputs_segment_ids"], row["targets_segment_ids"]
    for s in range(1, seg_in.max() + 1):
      got_in, got_out = row["inputs"][seg_in == s], row["targets"][seg_out == s]
      # A pair never crosses a row: both sides whole, in one row, positions from 0.
      assert got_in[0] // 1000 == got_out[0] // 1000
      np.testing.assert_array_equal(row["inputs_positions"][seg_in == s], np.arange(len(got_in)))
      np.testing.assert_array_equal(row["targets_positions"][seg_out == s],
                                    np.arange(len(got_out)))
      packed[(tuple(got_in.tolist()), tuple(got_out.tolist()))] += 1
    assert set(np.unique(seg_in)) - {0} == set(range(1, seg_in.max() + 1))
  expected = collections.Counter((tuple(p["inputs"].tolist()), tuple(p["targets"].tolist()))
                                 for p in pairs)
  assert packed == expected
  all_tokens = np.concatenate([row[f][row[f] != 0] for row in rows for f in pipeline.FEATURES])
  assert len(all_tokens) == len(set(all_tokens.tolist())) == sum(
      len(p["inputs"]) + len(p["targets"]) for p in pairs)


@pytest.mark.parametrize("packing", [True, False])
def test_train_batches_have_the_configured_shape_and_a_prefix_of_the_stream(
    packing, small_config, numbers_tokenizer, numbers_data_dir):
  config = small_config(packing=packing)
  batches = take(pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir), 5)
  for batch in batches:
    assert set(batch) == KEYS
    for value in batch.values():
      assert value.shape == (config.train.batch_size, config.data.max_len)
      assert value.dtype == np.int32
    assert not np.any(batch["targets"][:, 0] == BOS_ID), "targets must not be shifted"
  pairs = segments(batches)
  if not packing:
    assert len(pairs) == 5 * config.train.batch_size
  else:
    assert len(pairs) > 1.5 * 5 * config.train.batch_size, "packing packs little"
  expected = [p[:2] for p in itertools.islice(
      stream(config, numbers_tokenizer, numbers_data_dir), len(pairs))]
  assert collections.Counter(pairs) == collections.Counter(expected)


# --- Host shards. ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_pairs", [48, 50])
@pytest.mark.parametrize("count,block_size", [(1, 1), (2, 1), (4, 1), (2, 3), (4, 4)])
def test_shards_are_disjoint_and_cover_the_data_once_per_epoch(num_pairs, count, block_size):
  source = [{"source": str(i), "target": str(i)} for i in range(num_pairs)]
  # The global order, two epochs of it, as one process sees it.
  reference = pipeline.train_shard(source, seed=7, process_index=0, process_count=1)
  order = [reference[i]["source"] for i in range(2 * num_pairs)]
  assert sorted(order[:num_pairs], key=int) == [str(i) for i in range(num_pairs)]
  everything = []
  for index in range(count):
    shard = pipeline.train_shard(source, seed=7, process_index=index, process_count=count,
                                 block_size=block_size)
    # Brute force: position g of the global order goes to process (g // block_size) % count.
    mine = [g for g in range(2 * num_pairs) if (g // block_size) % count == index]
    assert [shard[i]["source"] for i in range(len(mine))] == [order[g] for g in mine]
    assert [shard[i]["epoch"] for i in range(len(mine))] == [g // num_pairs for g in mine]
    everything += [order[g] for g in mine if g < num_pairs]
  assert sorted(everything, key=int) == [str(i) for i in range(num_pairs)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_train_iterators_of_all_processes_cover_the_split_once(count, small_config,
                                                               numbers_tokenizer, tmp_path):
  config = small_config(num_train=96, packing=False)
  data_dir = str(tmp_path)
  source = sources.get_split(config, "train", data_dir)
  index_of = {pipeline.tokenize(numbers_tokenizer, source[i])["inputs"].tobytes(): i
              for i in range(len(source))}
  assert len(index_of) == len(source)
  per_host = config.train.batch_size // count
  seen = []
  for index in range(count):
    iterator = pipeline.make_train_iterator(config, numbers_tokenizer, data_dir,
                                            process_index=index, process_count=count)
    for batch in take(iterator, 96 // config.train.batch_size):
      assert batch["inputs"].shape == (per_host, config.data.max_len)
      for row, length in zip(batch["inputs"], batch["inputs_segment_ids"].sum(1)):
        seen.append(index_of[row[:length].tobytes()])
  assert sorted(seen) == list(range(96))


@pytest.mark.parametrize("count", [2, 4])
def test_process_batches_stacked_in_process_order_are_the_one_process_batches(
    count, small_config, numbers_tokenizer, numbers_data_dir):
  # What makes a P-process run train on the same global batches as a one-process run.
  config = small_config(packing=False, length_policy="truncate")
  one = take(pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir,
                                          process_index=0, process_count=1), 3)
  each = [take(pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir,
                                            process_index=index, process_count=count), 3)
          for index in range(count)]
  for step, want in enumerate(one):
    for key in want:
      np.testing.assert_array_equal(
          np.concatenate([batches[step][key] for batches in each]), want[key])


def test_batch_size_must_divide_by_processes(small_config, numbers_tokenizer, numbers_data_dir):
  with pytest.raises(ConfigError, match=r"train\.batch_size=8 does not divide by the 3 processes"):
    pipeline.make_train_iterator(small_config(), numbers_tokenizer, numbers_data_dir,
                                 process_index=0, process_count=3)


# --- Resume. ---------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [True, False])
def test_restored_iterator_continues_with_the_same_batches(packing, small_config,
                                                          numbers_tokenizer, tmp_path):
  # 40 pairs: the 7 batches below run over several epochs (each reshuffled).
  config = small_config(num_train=40, packing=packing)
  data_dir = str(tmp_path)
  first = pipeline.make_train_iterator(config, numbers_tokenizer, data_dir,
                                       process_index=1, process_count=2)
  take(first, 3)
  state = json.loads(json.dumps(first.get_state()))  # Checkpoints store it as JSON.
  expected = take(first, 4)
  second = pipeline.make_train_iterator(config, numbers_tokenizer, data_dir,
                                        process_index=1, process_count=2)
  second.set_state(state)
  for want, got in zip(expected, take(second, 4)):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  fresh = take(pipeline.make_train_iterator(config, numbers_tokenizer, data_dir,
                                            process_index=1, process_count=2), 1)[0]
  assert not np.array_equal(fresh["inputs"], expected[0]["inputs"]), "state was ignored"


@pytest.mark.parametrize("packing", [True, False])
def test_a_resumed_run_may_change_the_batch_size_and_continues_the_data(
    packing, small_config, numbers_tokenizer, numbers_data_dir):
  """train.batch_size may change on resume (workdir.check_compatible allows it): the new
  iterator picks the stream up where the old one stopped, no pair repeated or skipped."""
  config = small_config(packing=packing)
  first = pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir)
  before = segments(take(first, 3))
  state = json.loads(json.dumps(first.get_state()))
  config.train.batch_size *= 2
  second = pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir)
  second.set_state(state)
  batches = take(second, 2)
  assert batches[0]["inputs"].shape[0] == config.train.batch_size
  seen = before + segments(batches)
  expected = [pair[:2] for pair in itertools.islice(
      stream(config, numbers_tokenizer, numbers_data_dir), len(seen))]
  if packing:  # Pairs may be placed out of order, but each of the stream's first ones once.
    assert sorted(seen) == sorted(expected)
  else:
    assert seen == expected


def test_state_is_that_of_the_last_batch_handed_out_not_of_the_prefetched_ones(
    small_config, numbers_tokenizer, numbers_data_dir):
  config = small_config()
  first = pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir)
  take(first, 2)
  deadline = time.monotonic() + 30
  while not first._buffer.full() and time.monotonic() < deadline:  # pylint: disable=protected-access
    time.sleep(0.01)  # The thread has made PREFETCH_BATCHES batches past the two handed out.
  assert first._buffer.full()  # pylint: disable=protected-access
  state = json.loads(json.dumps(first.get_state()))
  expected = take(first, 2)
  second = pipeline.make_train_iterator(config, numbers_tokenizer, numbers_data_dir)
  second.set_state(state)
  for want, got in zip(expected, take(second, 2)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  first.close()
  first.close()  # Closing twice (explicitly, then at exit or collection) is harmless.


# --- Length policy. --------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_over_long_pairs_are_counted_and_dropped_or_truncated(policy, small_config,
                                                              numbers_tokenizer, tmp_path, caplog):
  max_len, num_pairs = 6, 96
  config = small_config(num_train=num_pairs, max_len=max_len, length_policy=policy,
                        packing=False)
  data_dir = str(tmp_path)
  epoch = [p[:2] for p in itertools.takewhile(
      lambda p: p[2] == 0, stream(config, numbers_tokenizer, data_dir))]
  over = [max(len(a), len(b)) > max_len for a, b in epoch]
  assert 0 < sum(over) < num_pairs, "the test needs some long and some short pairs"
  if policy == "drop":
    expected = [pair for pair, long in zip(epoch, over) if not long]
  else:
    expected = [tuple(s[:max_len - 1] + (EOS_ID,) if len(s) > max_len else s for s in pair)
                for pair in epoch]
  with caplog.at_level(logging.WARNING, logger="jaxformer.data.pipeline"):
    iterator = pipeline.make_train_iterator(config, numbers_tokenizer, data_dir)
    batches = take(iterator, math.ceil(len(expected) / config.train.batch_size) + 1)
    assert segments(batches)[:len(expected)] == expected
  done = "dropped" if policy == "drop" else "truncated"
  messages = [r.getMessage() for r in caplog.records]
  assert any(f"pairs like it are {done}" in m for m in messages), messages
  assert sum(f"{sum(over)} of {num_pairs} pairs read were longer than data.max_len={max_len} and "
             f"were {done}" in m for m in messages) == 1, messages


# --- Evaluation batches. ---------------------------------------------------------------------

# 8: shards of 8 and 7, so some pad a batch; max_examples 23 (of 60): the first 23 only, in
# fewer batches; 1: a process with no example at all still yields its (filler) batch.
@pytest.mark.parametrize("count, max_examples", [(1, None), (2, None), (3, None), (8, None),
                                                 (3, 23), (2, 1), (1, 500)])
def test_eval_batches_hold_every_example_once(count, max_examples, small_config,
                                              numbers_tokenizer, numbers_data_dir):
  config, batch_size = small_config(), 7
  references = pipeline.eval_references(config, numbers_data_dir, "validation", max_examples)
  expected = 60 if max_examples is None else min(max_examples, 60)
  assert len(references) == expected
  assert references == pipeline.eval_references(config, numbers_data_dir,
                                                "validation")[:expected]
  seen, num_batches = [], set()
  for index in range(count):
    batches = list(pipeline.make_eval_batches(
        config, numbers_tokenizer, numbers_data_dir, "validation", batch_size=batch_size,
        process_index=index, process_count=count, max_examples=max_examples))
    num_batches.add(len(batches))
    for batch in batches:
      assert set(batch) == KEYS | {"example_ids"}
      assert batch["example_ids"].shape == (batch_size,) and batch["example_ids"].dtype == np.int32
      for row, example_id in enumerate(batch["example_ids"]):
        if example_id < 0:
          assert all(not np.any(batch[key][row]) for key in KEYS), "filler rows are all PAD"
          continue
        seen.append(int(example_id))
        source, target = references[example_id]
        assert numbers_tokenizer.decode(batch["inputs"][row]) == source
        assert numbers_tokenizer.decode(batch["targets"][row]) == target
        assert batch["inputs_segment_ids"][row].max() == 1
  assert num_batches == {max(1, math.ceil(math.ceil(expected / count) / batch_size))}
  assert sorted(seen) == list(range(expected))


def test_over_long_eval_examples_are_truncated_and_counted(small_config, numbers_tokenizer,
                                                           numbers_data_dir, caplog):
  max_len = 6
  config = small_config(max_len=max_len, length_policy="drop")  # Eval never drops.
  references = pipeline.eval_references(config, numbers_data_dir, "test")
  long = sum(max(len(numbers_tokenizer.encode(text)) + 1 for text in pair) > max_len
             for pair in references)
  assert long > 0
  with caplog.at_level(logging.WARNING, logger="jaxformer.data.pipeline"):
    batches = list(pipeline.make_eval_batches(config, numbers_tokenizer, numbers_data_dir,
                                              "test", batch_size=16))
  ids = np.concatenate([b["example_ids"] for b in batches])
  assert sorted(ids[ids >= 0].tolist()) == list(range(len(references)))
  for batch in batches:
    lengths = (batch["inputs"] != PAD_ID).sum(1)
    assert np.all(batch["inputs"][lengths == max_len, -1] == EOS_ID)
  assert any(f"{long} of {len(references)} pairs read were longer than data.max_len={max_len} and "
             "were truncated" in r.getMessage() for r in caplog.records)


# --- WMT under tfds.testing.mock_data. -------------------------------------------------------

@pytest.mark.parametrize("direction", ["en-de", "de-en"])
def test_wmt_batches_under_mock_data(direction, small_config, tmp_path):
  config = small_config(task="tfds", tfds_name="wmt14_translate/de-en", direction=direction,
                        max_len=48)
  source_lang, target_lang = direction.split("-")
  with tfds.testing.mock_data(num_examples=24):
    tok = vocab.load_or_train(config, str(tmp_path))
    data_dir = workdir_lib.resolve_data_dir(config, str(tmp_path))
    batch = next(pipeline.make_train_iterator(config, tok, data_dir))
    assert {k: v.shape for k, v in batch.items()} == {k: (8, 48) for k in KEYS}
    records = tfds.data_source("wmt14_translate/de-en", split="validation")
    batches = list(pipeline.make_eval_batches(config, tok, data_dir, "validation", batch_size=8))
    for b in batches:
      for row, i in enumerate(b["example_ids"]):
        if i >= 0:
          want_source, want_target = (" ".join(str(records[int(i)][lang]).split())
                                      for lang in (source_lang, target_lang))
          assert tok.decode(b["inputs"][row]) == want_source
          assert tok.decode(b["targets"][row]) == want_target
  assert sum(int((b["example_ids"] >= 0).sum()) for b in batches) == 24


def test_dropping_every_pair_is_an_error_not_a_hang(small_config, numbers_tokenizer, tmp_path):
  config = small_config(num_train=24, max_len=1, length_policy="drop")  # Only EOS would fit.
  iterator = pipeline.make_train_iterator(config, numbers_tokenizer, str(tmp_path))
  with pytest.raises(DataError, match=r"all 24 pairs are longer than data\.max_len=1"):
    next(iterator)
