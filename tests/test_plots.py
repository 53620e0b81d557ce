"""Tests of jaxformer/plots.py: what is drawn is exactly the arrays given, and metrics.jsonl is
read as the curves need it.

The attention weights here are made-up probabilities: drawing must not depend on where they come
from (tests/test_attention_maps.py checks that those of the model are its own).
"""

import json
import os

import numpy as np

from jaxformer import plots
from jaxformer.attention_maps import AttentionMaps

from tests.tiny_run_testing import train_line, write_metrics

NUM_LAYERS, NUM_HEADS = 2, 4


def probabilities(rng, shape):
  """Random rows that sum to 1 over the last axis."""
  x = rng.uniform(size=shape).astype(np.float32)
  return x / x.sum(axis=-1, keepdims=True)


def made_up_maps(source_len=5, target_len=4) -> AttentionMaps:
  rng = np.random.default_rng(0)
  source = [f"▁s{i}" for i in range(source_len - 1)] + ["</s>"]
  target = [f"▁t{i}" for i in range(target_len - 1)] + ["</s>"]
  return AttentionMaps(
      source_ids=np.arange(source_len, dtype=np.int32),
      target_ids=np.arange(target_len, dtype=np.int32),
      source_pieces=source, target_pieces=target,
      decoder_input_pieces=["<s>"] + target[:-1], translation=" ".join(target[:-1]),
      cross=probabilities(rng, (NUM_LAYERS, NUM_HEADS, target_len, source_len)),
      encoder_self=probabilities(rng, (NUM_LAYERS, NUM_HEADS, source_len, source_len)),
      decoder_self=np.tril(probabilities(rng, (NUM_LAYERS, NUM_HEADS, target_len, target_len))))


def test_the_figure_draws_exactly_the_returned_weights():
  maps = made_up_maps()
  figure = plots.draw_attention(maps, layer=0)
  drawn = [np.asarray(ax.images[0].get_array()) for ax in figure.axes if ax.images]
  expected = ([maps.cross[0, h] for h in range(NUM_HEADS)]
              + [maps.cross[i].mean(axis=0) for i in range(NUM_LAYERS)]
              + [maps.encoder_self[i].mean(axis=0) for i in range(NUM_LAYERS)]
              + [maps.decoder_self[i].mean(axis=0) for i in range(NUM_LAYERS)])
  assert len(drawn) == len(expected)
  for d, e in zip(drawn, expected):
    np.testing.assert_array_equal(d, e)
  labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
  assert labels == maps.source_pieces


def test_plot_curves_later_lines_win_after_a_resume_and_averages_are_left_out(tmp_path):
  workdir = str(tmp_path / "resumed")
  averaged = json.dumps({"step": -1, "split": "train", "loss": 0.1})  # jaxformer evaluate
  write_metrics(workdir, [train_line(10, 3.0), train_line(20, 2.0), train_line(10, 2.9),
                          averaged])
  records, problems = plots.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert problems == []
  steps, values = plots.curve_series(records, "train", "loss")
  assert steps.tolist() == [10, 20] and values.tolist() == [2.9, 2.0]
