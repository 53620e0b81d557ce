"""Tests of jaxformer/plots.py and `jaxformer plot ...`.

A tiny run (vocabulary, config.json and one checkpoint of a 2-layer, 4-head model) is made once
per module. Expectations come from outside the code under test: image sizes from the PNG header,
attention weights from the model applied here directly, encodings from the paper's formula
written out again, curve points from the lines this file writes.
"""

import functools
import json
import math
import os
import struct

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxformer import checkpoint, cli, decode, plots
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import tasks
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID
from jaxformer.train import state as state_lib
from model.model_testing import stack_layers

NUM_LAYERS, NUM_HEADS = 2, 4
MAX_LEN = 16
STEP = 3
TEXT = "three hundred twenty one"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_config(**model) -> ml_collections.FrozenConfigDict:
  c = config_lib.get_default_config()
  c.model.update(vocab_size=48, num_layers=NUM_LAYERS, d_model=16, num_heads=NUM_HEADS, d_ff=32,
                 max_len=MAX_LEN, dropout_rate=0.0)
  c.model.update(model)
  c.data.max_len = MAX_LEN
  c.decode.update(beam_size=2, max_extra_len=4)
  config_lib.validate(c)
  return ml_collections.FrozenConfigDict(c)


def make_run(workdir, config, tokenizer, seed=0):
  """A workdir as training leaves it: config.json, vocab.model, checkpoints/STEP; returns the
  params (fresh from init_state: the plots need a model, not a good one)."""
  os.makedirs(workdir)
  tokenizer.save(os.path.join(workdir, workdir_lib.VOCAB_FILE))
  workdir_lib.write_run_config(workdir, config)
  state = state_lib.init_state(config, jax.random.key(seed)).replace(step=jnp.int32(STEP))
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=1, async_save=False) as ckpt:
    ckpt.save(STEP, state, data, force=True)
  # Placed as plots places them, so that compiled decoders are shared with plots.
  return jax.device_put(state.params, plots.inference_sharding())


@pytest.fixture(scope="module")
def tokenizer():
  sentences = [s for n in range(1, 400, 3)
               for s in (tasks.english_number(n), tasks.spanish_number(n))]
  return tokenizer_lib.train(sentences, vocab_size=48)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
  """(workdir, config, params) of a tiny run with one checkpoint."""
  workdir = str(tmp_path_factory.mktemp("runs") / "tiny")
  config = tiny_config()
  return workdir, config, make_run(workdir, config, tokenizer)


@pytest.fixture(scope="module")
def maps(run, tmp_path_factory):
  """plot_attention on the tiny run: (maps, path of the PNG)."""
  out = str(tmp_path_factory.mktemp("plots") / "attention.png")
  return plots.plot_attention(run[0], TEXT, out=out), out


@functools.partial(jax.jit, static_argnames="model")
def teacher_forced(model, params, source, target):
  """The model's logits and sown attention weights for one pair, as the model gives them."""
  return model.apply({"params": params}, source, target, mutable=["intermediates"])


def png_size(path):
  """(width, height) from the PNG's IHDR chunk."""
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
  return struct.unpack(">II", header[16:24])


def run_cli(capsys, *args):
  """(exit status, stdout, stderr lines) of `jaxformer ARGS` run in this process."""
  status = cli.main(list(args))
  captured = capsys.readouterr()
  return status, captured.out, captured.err.splitlines()


# --- plot attention. -------------------------------------------------------------------------

def test_attention_png_has_one_square_panel_per_matrix(maps):
  maps, out = maps
  source_len = len(maps.source_pieces)
  target_len = len(maps.target_pieces)
  side = plots.panel_inches(max(source_len, target_len)) * plots.DPI
  # Row 1: the 4 heads; rows 2-4: the 2 layers of cross, encoder and decoder attention.
  assert png_size(out) == (max(NUM_HEADS, NUM_LAYERS) * side, 4 * side)
  assert os.path.getsize(out) > 10_000


def test_attention_weights_are_the_models_own(run, maps, tokenizer):
  workdir, config, params = run
  maps, _ = maps
  model = Transformer(config=config.model)
  source = tokenizer.encode(TEXT) + [EOS_ID]
  assert maps.source_pieces == [tokenizer.id_to_piece(i) for i in source]
  assert maps.source_ids.tolist() == source
  # The translation: the same beam search, run here.
  d = config.decode
  result = decode.decode_batch(model, params, np.array([source]), beam_size=d.beam_size,
                               alpha=d.alpha, max_extra_len=d.max_extra_len)
  target = np.asarray(result.tokens[0, 0, :int(result.lengths[0, 0])])
  assert maps.target_pieces == [tokenizer.id_to_piece(i) for i in target]
  assert maps.target_ids.tolist() == target.tolist()
  assert maps.decoder_input_pieces == ["<s>"] + maps.target_pieces[:-1]
  # The model's own weights, from a teacher-forced pass run here.
  _, state = teacher_forced(model, params, jnp.array([source]), jnp.array([target]))
  sown = state["intermediates"]
  for i in range(NUM_LAYERS):
    layer = f"layers_{i}"
    np.testing.assert_allclose(
        maps.cross[i], sown["decoder"][layer]["cross_attention"]["attention_weights"][0][0],
        atol=1e-6)
    np.testing.assert_allclose(
        maps.encoder_self[i], sown["encoder"][layer]["self_attention"]["attention_weights"][0][0],
        atol=1e-6)
    np.testing.assert_allclose(
        maps.decoder_self[i], sown["decoder"][layer]["self_attention"]["attention_weights"][0][0],
        atol=1e-6)
  assert maps.cross.shape == (NUM_LAYERS, NUM_HEADS, len(target), len(source))
  # Probabilities over the keys: non-negative, summing to 1 over the source axis.
  assert (maps.cross >= 0).all()
  np.testing.assert_allclose(maps.cross.sum(axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(maps.encoder_self.sum(axis=-1), 1.0, atol=1e-5)
  # Masked decoder self-attention: nothing above the diagonal.
  above = np.triu(np.ones((len(target), len(target)), bool), k=1)
  assert (maps.decoder_self[:, :, above] == 0).all()


def test_the_figure_draws_exactly_the_returned_weights(maps):
  maps, _ = maps
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


def test_scanned_layers_sow_the_same_weights(run, maps):
  _, config, params = run
  source, target = maps[0].source_ids[None], maps[0].target_ids[None]
  _, unrolled = teacher_forced(Transformer(config=config.model), params, source, target)
  scanned_model = Transformer(config=tiny_config(scan_layers=True).model)
  _, scanned = teacher_forced(scanned_model, stack_layers(params, NUM_LAYERS), source, target)
  for stack, module in (("encoder", "self_attention"), ("decoder", "self_attention"),
                        ("decoder", "cross_attention")):
    layers = [unrolled["intermediates"][stack][f"layers_{i}"][module]["attention_weights"][0][0]
              for i in range(NUM_LAYERS)]
    np.testing.assert_array_equal(plots.sown_weights(unrolled["intermediates"][stack], module),
                                  np.stack(layers))
    np.testing.assert_allclose(plots.sown_weights(scanned["intermediates"][stack], module),
                               np.stack(layers), atol=1e-6)


def test_cli_plot_attention(run, tmp_path, capsys, monkeypatch):
  out = str(tmp_path / "a.png")
  monkeypatch.chdir(os.path.dirname(run[0]))  # A relative --workdir, as ./launch.sh makes them.
  status, stdout, err = run_cli(capsys, "plot", "attention", "--workdir",
                                os.path.basename(run[0]), "--text", TEXT, "--out", out,
                                "--layer", "0", "--step", str(STEP))
  assert status == 0, err
  assert stdout.strip() == out
  assert err[-1].startswith("translation: ")
  width, height = png_size(out)
  assert width * 4 == height * max(NUM_HEADS, NUM_LAYERS)  # 4 rows of square panels.


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "empty"),
    (["--text", "   "], "empty"),
    (["--text", " ".join(["seven hundred"] * 8)], "model.max_len=16"),
    (["--text", TEXT, "--layer", "2"], "--layer 2"),
    (["--text", TEXT, "--step", "99"], "no checkpoint at step 99"),
])
def test_cli_plot_attention_bad_input(run, tmp_path, capsys, args, message):
  out = tmp_path / "a.png"
  status, _, err = run_cli(capsys, "plot", "attention", "--workdir", run[0], "--out", str(out),
                           *args)
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not out.exists()


def test_cli_plot_attention_without_a_checkpoint(tmp_path, capsys, tokenizer):
  missing = str(tmp_path / "missing")
  status, _, err = run_cli(capsys, "plot", "attention", "--workdir", missing, "--text", TEXT)
  assert status == 2 and len(err) == 1 and "does not exist" in err[0], err
  empty = tmp_path / "empty"  # A run that has not saved a checkpoint yet.
  empty.mkdir()
  workdir_lib.write_run_config(str(empty), tiny_config())
  tokenizer.save(str(empty / workdir_lib.VOCAB_FILE))
  status, _, err = run_cli(capsys, "plot", "attention", "--workdir", str(empty), "--text", TEXT)
  assert status == 2 and len(err) == 1 and "no checkpoints" in err[0], err


class RecordingWriter:
  """Stands in for MetricsWriter: remembers what was written."""

  def __init__(self):
    self.images, self.texts = {}, {}

  def write_image(self, step, tag, image):
    self.images[(step, tag)] = image

  def write_text(self, step, tag, text):
    self.texts[(step, tag)] = text


def test_tensorboard_hook_writes_an_attention_image(run, tokenizer, capsys):
  _, config, params = run
  writer = RecordingWriter()
  model = Transformer(config=config.model)
  plots.log_attention_to_tensorboard(writer, 10, model, params, tokenizer, TEXT, config)
  image = writer.images[(10, "validation/attention")]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] >= plots.MIN_PANEL_INCHES * plots.DPI
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # A picture, not a blank.
  assert writer.texts[(10, "validation/attention_translation")].startswith(TEXT + " -> ")
  # A sentence that does not fit is skipped with a warning; training goes on.
  plots.log_attention_to_tensorboard(writer, 20, model, params, tokenizer,
                                     " ".join(["seven hundred"] * 8), config)
  assert (20, "validation/attention") not in writer.images
  assert "model.max_len" in capsys.readouterr().err


# --- plot positions. -------------------------------------------------------------------------

def paper_encoding(max_len, d_model):
  """PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)), written out."""
  table = np.zeros((max_len, d_model))
  for p in range(max_len):
    for i in range(d_model // 2):
      angle = p / 10000 ** (2 * i / d_model)
      table[p, 2 * i], table[p, 2 * i + 1] = math.sin(angle), math.cos(angle)
  return table


def test_plot_positions_sinusoidal(tmp_path):
  config = tiny_config()
  out = str(tmp_path / "p.png")
  tables = plots.plot_positions(config, out=out)
  (table,) = tables.values()
  np.testing.assert_allclose(table, paper_encoding(MAX_LEN, 16), atol=1e-6)
  # The dot product of two sinusoidal encodings depends only on their distance:
  # sum_i sin(a p) sin(a q) + cos(a p) cos(a q) = sum_i cos(a (p - q)).
  rates = 1 / 10000 ** (np.arange(0, 16, 2) / 16)
  distance = np.arange(MAX_LEN)[:, None] - np.arange(MAX_LEN)[None, :]
  expected = np.cos(distance[..., None] * rates).sum(-1)
  np.testing.assert_allclose(plots.position_similarity(table), expected, atol=1e-5)
  width, height = plots.POSITIONS_PANEL_INCHES
  assert png_size(out) == (2 * width * plots.DPI, height * plots.DPI)


def test_plot_positions_learned_comes_from_the_checkpoint(tmp_path, tokenizer):
  workdir = str(tmp_path / "learned")
  params = make_run(workdir, tiny_config(pos_encoding="learned"), tokenizer, seed=1)
  out = str(tmp_path / "p.png")
  tables = plots.plot_positions(workdir=workdir, out=out)  # The run's own config.
  assert len(tables) == 2
  for name, stack in zip(tables, ("encoder", "decoder")):
    assert stack in name
    np.testing.assert_array_equal(tables[name], params[stack]["positions"]["pos_embedding"])
  width, height = plots.POSITIONS_PANEL_INCHES
  assert png_size(out) == (2 * width * plots.DPI, 2 * height * plots.DPI)


def test_cli_plot_positions(tmp_path, capsys):
  out = str(tmp_path / "p.png")
  status, stdout, err = run_cli(capsys, "plot", "positions", "--config", "default",
                                "--config.model.d_model=32", "--out", out)
  assert status == 0, err
  assert stdout.strip() == out and png_size(out) == (1000, 400)
  status, _, err = run_cli(capsys, "plot", "positions", "--config", "default",
                           "--config.model.pos_encoding=learned", "--out", out)
  assert status == 2 and len(err) == 1 and "--workdir" in err[0], err


# --- plot curves. ----------------------------------------------------------------------------

def write_metrics(workdir, lines):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def train_line(step, loss):
  return json.dumps({"step": step, "split": "train", "loss": loss, "learning_rate": 1e-3 * step,
                     "tokens_per_second": 1000.0 + step})


def test_plot_curves_reports_bad_lines_and_draws_the_good_ones(tmp_path, capsys):
  workdir = str(tmp_path / "run_a")
  write_metrics(workdir, [
      train_line(10, 3.0),
      '{"step": 20, "split": "train", "loss": 2.',                          # 2: cut short
      train_line(30, 2.5),
      "",                                                                   # 4: empty
      '{"split": "train", "loss": 2.0}',                                    # 5: no step
      '[1, 2, 3]',                                                          # 6: not an object
      '{"step": 40, "split": "train", "loss": "nan", "learning_rate": 0.04}',  # 7: nan loss
      json.dumps({"step": 40, "split": "validation", "loss": 2.4, "bleu": 12.5}),
      train_line(50, 2.0),
  ])
  other = str(tmp_path / "run_b")
  write_metrics(other, [train_line(10, 4.0), train_line(20, 3.5)])
  out = str(tmp_path / "c.png")
  status, stdout, err = run_cli(capsys, "plot", "curves", "--workdir", workdir, "--workdir",
                                other, "--out", out)
  assert status == 0
  path = os.path.join(workdir, "metrics.jsonl")
  reported = sorted(int(line.split(path + ":")[1].split(":")[0]) for line in err)
  assert reported == [2, 4, 5, 6, 7], err
  assert png_size(out) == (1200, 800)

  runs = plots.plot_curves([workdir, other], out=out)
  assert list(runs) == ["run_a", "run_b"]
  figure = plots.draw_curves(runs)
  loss_axes, lr_axes = figure.axes[0], figure.axes[1]
  curves = [(list(line.get_xdata()), list(line.get_ydata())) for line in loss_axes.lines]
  assert curves == [([10, 30, 50], [3.0, 2.5, 2.0]),   # run_a train
                    ([40], [2.4]),                     # run_a validation
                    ([10, 20], [4.0, 3.5])]            # run_b train
  # Line 7's loss is dropped, its valid learning rate is kept.
  assert list(lr_axes.lines[0].get_xdata()) == [10, 30, 40, 50]
  legend = [t.get_text() for t in loss_axes.get_legend().get_texts()]
  assert legend[:2] == ["run_a", "run_b"]


def test_plot_curves_later_lines_win_after_a_resume_and_averages_are_left_out(tmp_path):
  workdir = str(tmp_path / "resumed")
  averaged = json.dumps({"step": -1, "split": "train", "loss": 0.1})  # jaxformer evaluate
  write_metrics(workdir, [train_line(10, 3.0), train_line(20, 2.0), train_line(10, 2.9),
                          averaged])
  records, problems = plots.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert problems == []
  steps, values = plots.curve_series(records, "train", "loss")
  assert steps.tolist() == [10, 20] and values.tolist() == [2.9, 2.0]


def test_cli_plot_curves_without_metrics(tmp_path, capsys):
  status, _, err = run_cli(capsys, "plot", "curves", "--workdir", str(tmp_path))
  assert status == 2 and len(err) == 1 and "metrics.jsonl does not exist" in err[0], err
  write_metrics(str(tmp_path), ["not json"])
  status, _, err = run_cli(capsys, "plot", "curves", "--workdir", str(tmp_path))
  assert status == 2 and err[-1].startswith("error: no valid metrics"), err


# --- During training. ------------------------------------------------------------------------

def read_event_tags(directory):
  """{(tag, kind): [steps]} of the TensorBoard event files in `directory` (TFRecord framing:
  length u64, its crc u32, the Event proto, its crc u32), read without TensorFlow."""
  from tensorboardX.proto import event_pb2
  tags = {}
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        tags.setdefault((value.tag, value.WhichOneof("value")), []).append(event.step)
  return tags


@pytest.mark.slow
def test_training_writes_an_attention_image_at_each_evaluation(tmp_path):
  from jaxformer.train import loop
  config = config_lib.load_config("reverse", {
      "data.num_train": "64", "data.num_validation": "8", "data.num_test": "8",
      "model.num_layers": "1", "model.d_model": "16", "model.d_ff": "32",
      "train.steps": "2", "train.batch_size": "8", "train.eval_every_steps": "1",
      "train.log_every_steps": "1", "train.peak_flops": "1e12", "eval.batch_size": "8",
      "eval.bleu_examples": "8", "eval.num_samples": "2", "checkpoint.every_steps": "2"})
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)
  tags = read_event_tags(os.path.join(workdir, "tensorboard"))
  assert tags[("validation/attention", "image")] == [1, 2]
  assert tags[("validation/attention_translation/text_summary", "tensor")] == [1, 2]
  assert tags[("validation/samples/text_summary", "tensor")] == [1, 1, 2, 2]
