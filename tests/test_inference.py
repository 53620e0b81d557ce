"""Tests of jaxformer/inference.py and of the `jaxformer plot ...` commands it carries out.

Parameters: loaded from any layout, averaged, and a run written by older code loads. Pictures:
a tiny run (vocabulary, config.json and one checkpoint of a 2-layer, 4-head model) is made once
per module. Expectations come from outside the code under test: image sizes from the PNG header,
encodings from the paper's formula written out again, curve points from the lines this file
writes.
"""

import functools
import json
import math
import os
import struct
import types

import jax
import ml_collections
import numpy as np
import pytest

from jaxformer import checkpoint, cli, inference, objective, plots
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError, InputError
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID, PAD_ID

from tests import checkpoint_testing
from tests import tiny_run_testing
from tests.checkpoint_testing import assert_trees_identical, one_device, save_steps, write_config
from tests.tiny_run_testing import (MAX_LEN, NUM_HEADS, NUM_LAYERS, STEP, TEXT, make_run,
                                    tiny_config, train_line, write_metrics)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- Parameters. -----------------------------------------------------------------------------

def test_fsdp_params_on_8_devices_load_onto_1_device(tmp_path):
  state = checkpoint_testing.save_fsdp_state(str(tmp_path), step=2)
  target = one_device()
  # Inference: the params alone, on one device, whatever the training layout was.
  write_config(tmp_path)
  params, step, _ = inference.load_params(str(tmp_path), sharding=target)
  assert step == 2
  assert_trees_identical(params, state.params)
  assert all(leaf.sharding == target for leaf in jax.tree.leaves(params))


def test_load_params_replicates_on_local_devices_without_optimizer_state(tmp_path):
  states = save_steps(str(tmp_path), [1, 2])
  config = write_config(tmp_path, **{"model.d_model": 64})
  params, step, loaded_config = inference.load_params(str(tmp_path), step=1)
  assert step == 1 and loaded_config.model.d_model == config.model.d_model == 64
  assert set(params) == {"embed", "dense"}  # Params only: no step, no optimizer moments.
  assert_trees_identical(params, states[1].params)
  kernel = params["dense"]["kernel"]
  assert len(kernel.sharding.device_set) == jax.local_device_count()
  assert kernel.sharding.is_fully_replicated
  newest, newest_step, _ = inference.load_params(str(tmp_path))
  assert newest_step == 2
  assert_trees_identical(newest, states[2].params)


def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path):
  workdir = str(tmp_path)
  states = save_steps(workdir, [10, 20, 30])
  write_config(tmp_path)
  path = inference.average_checkpoints(workdir, 2)
  assert path == os.path.join(workdir, "averaged", "last2_20-30")
  assert checkpoint.averaged_checkpoints(workdir) == ["last2_20-30"]

  averaged, label, _ = inference.load_params(workdir, step="last2_20-30")
  assert label == "last2_20-30"
  expected = jax.tree.map(
      lambda a, b: ((np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2).astype(a.dtype),
      states[20].params, states[30].params)
  assert_trees_identical(averaged, expected)
  assert not np.array_equal(expected["dense"]["kernel"], states[30].params["dense"]["kernel"])

  for step in (10, 20, 30):  # The originals are unchanged.
    params, _, _ = inference.load_params(workdir, step=step)
    assert_trees_identical(params, states[step].params)

  with pytest.raises(CheckpointError, match=r"last2_20-30 already exists; it is never overwritten"):
    inference.average_checkpoints(workdir, 2)
  with pytest.raises(CheckpointError, match=r"cannot average the last 4 checkpoints: .* has 3 "
                                            r"\(steps: 10, 20, 30\)"):
    inference.average_checkpoints(workdir, 4)


def mean_params(*states):
  total = sum(np.asarray(s.params["dense"]["kernel"], np.float64) for s in states)
  return (total / len(states)).astype(np.float32)


def test_average_up_to_a_step_or_the_best_takes_the_last_k_at_or_before_it(tmp_path):
  workdir = str(tmp_path)
  states = save_steps(workdir, [10, 20, 30, 40], keep_best="loss",
                      scores={10: 3.0, 20: 1.0, 30: None, 40: 2.0})
  write_config(tmp_path, **{"checkpoint.keep_best": "loss"})
  path = inference.average_checkpoints(workdir, 2, up_to=30)
  assert path == os.path.join(workdir, "averaged", "last2_20-30")
  averaged, _, _ = inference.load_params(workdir, step="last2_20-30")
  np.testing.assert_array_equal(averaged["dense"]["kernel"], mean_params(states[20], states[30]))
  # 'best' is step 20 (the lowest loss): the last 2 up to it are 10 and 20.
  assert inference.average_checkpoints(workdir, 2, up_to="best").endswith("last2_10-20")

  with pytest.raises(CheckpointError, match=r"^cannot average the last 3 checkpoints up to step "
                                            r"20: .* has 2 at or before it \(steps: 10, 20\)$"):
    inference.average_checkpoints(workdir, 3, up_to="best")
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 25 .*available steps: 10, "
                                            r"20, 30, 40"):
    inference.average_checkpoints(workdir, 1, up_to=25)
  with pytest.raises(CheckpointError, match=r"--step last2_20-30: average checkpoints up to a "
                                            r"saved step or 'best'"):
    inference.average_checkpoints(workdir, 1, up_to="last2_20-30")


def test_load_params_without_checkpoints_is_a_clear_error(tmp_path):
  write_config(tmp_path)
  with pytest.raises(CheckpointError, match=r"no checkpoints in .*checkpoints; train first"):
    inference.load_params(str(tmp_path))
  with pytest.raises(CheckpointError, match=r"does not exist"):
    inference.load_params(str(tmp_path / "missing"))


def test_load_params_of_a_missing_step_lists_the_available_ones(tmp_path):
  save_steps(str(tmp_path), [3, 6])
  write_config(tmp_path)
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 4 .*available steps: 3, 6$"):
    inference.load_params(str(tmp_path), step=4)
  with pytest.raises(CheckpointError, match=r"no averaged checkpoint 'last9_1-2'"):
    inference.load_params(str(tmp_path), step="last9_1-2")


def test_a_run_written_by_older_code_loads_for_inference(tmp_path):
  workdir = checkpoint_testing.copy_checkpoint_v0(tmp_path / "v0")
  expected = checkpoint_testing.checkpoint_v0_expected()
  run = inference.load_for_inference(workdir)
  assert run.step == expected["step"]
  params, params_digest = checkpoint_testing.digest(run.params)
  assert params == expected["params"]
  assert params_digest == expected["params_sha256"]
  assert run.model.config == run.config.model == workdir_lib.read_run_config(workdir).model
  assert run.tokenizer.decode(run.tokenizer.encode("one hundred")) == "one hundred"


# --- Evaluation. ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_params():
  return tiny_run_testing.init_params(tiny_config())


@pytest.mark.parametrize("batch_size, num_devices", [(8, 8), (4, 1)])
def test_evaluation_step_sums_what_the_model_computes(tiny_params, batch_size, num_devices):
  """Parameters replicated over every device when eval.batch_size divides their number, else
  on one; either way the sums of the whole batch, as forward_sums gives them on one device."""
  c = tiny_config().to_dict()
  c["eval"]["batch_size"] = batch_size
  config = ml_collections.FrozenConfigDict(c)
  model = Transformer(config=config.model)
  params = tiny_params
  rng = np.random.default_rng(0)
  inputs = rng.integers(4, 40, (batch_size, MAX_LEN)).astype(np.int32)
  targets = rng.integers(4, 40, (batch_size, MAX_LEN)).astype(np.int32)
  targets[:, -3:] = PAD_ID  # Some padding, which counts for nothing.
  positions = np.tile(np.arange(MAX_LEN, dtype=np.int32), (batch_size, 1))
  batch = {"inputs": inputs, "targets": targets, "inputs_positions": positions,
           "targets_positions": positions, "inputs_segment_ids": np.ones_like(inputs),
           "targets_segment_ids": (targets != PAD_ID).astype(np.int32),
           "example_ids": np.arange(batch_size, dtype=np.int32)}  # As the pipeline gives them.
  placed, eval_step = inference.evaluation_step(config, model, params)
  assert all(len(leaf.sharding.device_set) == num_devices and leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(placed))
  sums = jax.device_get(eval_step(batch))
  expected = jax.device_get(jax.jit(functools.partial(
      objective.forward_sums, model=model, label_smoothing=config.train.label_smoothing,
      dropout_rng=None))(params, {k: batch[k] for k in objective.BATCH_KEYS}))
  assert set(sums) == set(expected) and sums["num_tokens"] == batch_size * (MAX_LEN - 3)
  for key in expected:
    np.testing.assert_allclose(sums[key], expected[key], rtol=1e-5)


# --- Pictures. --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
  return tiny_run_testing.number_tokenizer()


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
  return inference.plot_attention(run[0], TEXT, out=out), out


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
  inference.log_attention_to_tensorboard(writer, 10, model, params, tokenizer, TEXT, config)
  image = writer.images[(10, "validation/attention")]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] >= plots.MIN_PANEL_INCHES * plots.DPI
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # A picture, not a blank.
  assert writer.texts[(10, "validation/attention_translation")].startswith(TEXT + " -> ")
  # A sentence that does not fit is skipped with a warning; training goes on.
  inference.log_attention_to_tensorboard(writer, 20, model, params, tokenizer,
                                     " ".join(["seven hundred"] * 8), config)
  assert (20, "validation/attention") not in writer.images
  assert "model.max_len" in capsys.readouterr().err


# --- Translating files and streams. -----------------------------------------------------------

# Lines of two source widths (10 tokens: width 16; 3 and 7: width 8), so that a chunk decodes
# in two groups and must put them back in input order.
REAL = ["three hundred twelve", "forty two", "seven hundred seventy seven"]
TOO_LONG = " ".join(["seven hundred"] * 8)  # 25 tokens with EOS: more than MAX_LEN.


@pytest.fixture(scope="module")
def translator(run):
  """(decoder, tokenizer) of the tiny run, beam 3, on the 8 devices of this process."""
  loaded = inference.load_for_inference(run[0])
  return inference.parallel_decoder(loaded, beam_size=3), loaded.tokenizer


def translate_lines(translator, lines, **settings):
  """The text `inference.translate` writes for `lines`."""
  decoder, tokenizer = translator
  written = []
  inference.translate(decoder, tokenizer, inference.LineSource(lambda: iter(lines), "test"),
                      written.append, **{"batch_size": 8, **settings})
  return "".join(written)


def test_translate_reads_10000_lines_one_chunk_at_a_time_and_writes_each_in_order(translator):
  """Bounded memory: when chunk k is written, exactly its lines and those before were read."""
  lines = [""] * 10_000
  for k in range(10):  # Each chunk of 1000 lines holds the 3 real lines, in another order.
    for j in range(3):
      lines[1000 * k + 7 + 300 * j] = REAL[(j + k) % 3]
  read = []

  def reading():
    for line in lines:
      read.append(line)
      yield line

  writes = []
  decoder, tokenizer = translator
  report = inference.translate(decoder, tokenizer, inference.LineSource(reading, "test"),
                               lambda text: writes.append((len(read), text)), batch_size=1000)
  assert report == inference.TranslateReport(lines=10_000, truncated=0)
  assert [consumed for consumed, _ in writes] == list(range(1000, 10_001, 1000))
  assert all(text.count("\n") == 1000 for _, text in writes)
  alone = dict(zip(REAL, translate_lines(translator, REAL).splitlines()))
  assert len(set(alone.values())) == 3, alone  # Misplaced lines would show.
  output = "".join(text for _, text in writes).split("\n")[:-1]
  assert output == [alone.get(line, "") for line in lines]


def test_nbest_3_with_scores_rows_ranks_scores_and_the_plain_translation(
    run, translator, tmp_path, capsys):
  lines = [REAL[0], "", REAL[1], REAL[2]]
  source = tmp_path / "in.txt"
  source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  outputs = {}
  for name, flags in (("nbest", ["--nbest", "3", "--scores"]), ("plain", [])):
    outputs[name] = tmp_path / f"{name}.txt"
    status = cli.main(["translate", "--workdir", run[0], "--beam-size", "3", "--input",
                       str(source), "--output", str(outputs[name]), *flags])
    assert status == 0, capsys.readouterr().err
  plain = outputs["plain"].read_text(encoding="utf-8").split("\n")[:-1]
  rows = [row.split("\t") for row in outputs["nbest"].read_text(encoding="utf-8").splitlines()]
  assert [(int(i), int(rank)) for i, rank, _, _ in rows] == [(i, r) for i in range(4)
                                                             for r in (1, 2, 3)]
  scores = np.array([float(s) for _, _, s, _ in rows]).reshape(4, 3)
  assert np.all(np.diff(scores, axis=1) <= 0), scores
  assert [text for _, rank, _, text in rows if rank == "1"] == plain
  assert rows[3:6] == [["1", str(r), "0", ""] for r in (1, 2, 3)]  # The empty line.

  decoder, tokenizer = translator
  real = [0, 2, 3]
  ids = [inference.encode_line(tokenizer, lines[i], MAX_LEN, "test")[0] for i in real]
  inputs = np.full((len(ids), MAX_LEN), PAD_ID, np.int32)  # Another shape than translate's.
  for row, line_ids in enumerate(ids):
    inputs[row, :len(line_ids)] = line_ids
  np.testing.assert_allclose(scores[real], decoder(inputs).scores, rtol=1e-5)


@pytest.mark.parametrize("flags, lines, fragments", [
    ([], ["one", "two", TOO_LONG, "three"],
     ["in.txt:3: the line has 25 tokens (EOS included), more than the model's max_len=16",
      "--truncate"]),
    (["--nbest", "3"], ["one"], ["--nbest 3 is more than the beam size, 2"]),
    (["--interactive"], ["one"], ["--interactive answers the lines of stdin; drop --input"]),
    (["pod"], ["one"], ["on a pod (2 processes) translate writes to --output FILE only"]),
], ids=["too-long", "nbest", "interactive-input", "pod-stdout"])
def test_translate_refuses_bad_input_in_one_line_and_writes_nothing(
    run, tmp_path, capsys, monkeypatch, flags, lines, fragments):
  source, out = tmp_path / "in.txt", tmp_path / "out.txt"
  source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  args = ["translate", "--workdir", run[0], "--input", str(source)]
  if flags == ["pod"]:  # A pod of 2 processes, to the check: nothing reaches its devices.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
  else:
    args += ["--output", str(out), *flags]
  status = cli.main(args)
  captured = capsys.readouterr()
  errors = captured.err.strip().splitlines()
  assert status == 2 and len(errors) == 1 and errors[0].startswith("error: "), captured.err
  assert all(fragment in errors[0] for fragment in fragments), errors[0]
  assert not out.exists() and captured.out == ""


def test_truncate_cuts_long_lines_and_counts_them(run, tmp_path, capsys):
  source, out = tmp_path / "in.txt", tmp_path / "out.txt"
  source.write_text(f"one\n{TOO_LONG}\n\n", encoding="utf-8")
  status = cli.main(["translate", "--workdir", run[0], "--input", str(source), "--output",
                     str(out), "--truncate", "--beam-size", "3"])  # The compiled beam of 3.
  err = capsys.readouterr().err
  assert status == 0, err
  assert ("jaxformer: 1 of 3 line(s) had more than max_len=16 tokens and were truncated "
          "(--truncate)") in err.splitlines()
  assert out.read_text(encoding="utf-8").count("\n") == 3


class NoLines:
  """A LineSource.open that must not be called: only process 0 reads the input."""

  def __call__(self):
    raise AssertionError("a process other than 0 read the input")


def test_an_input_error_on_process_0_is_sent_so_that_every_process_stops(
    tokenizer, monkeypatch):
  """Process 0 broadcasts the error in the chunk header, and raises it; another process, given
  that header, raises too (a simulated broadcast: a real pod is tests/test_cli.py's)."""
  decoder = types.SimpleNamespace(beam_size=2, max_len=MAX_LEN)  # Nothing is decoded.
  sent, received = [], []

  def send(tree):  # Process 0: every process gets what it sends.
    sent.append(np.array(tree))
    return np.array(tree)

  monkeypatch.setattr(inference.multihost_utils, "broadcast_one_to_all", send)
  source = inference.LineSource(lambda: iter(["one", TOO_LONG]), "in.txt", check_first=True)
  with pytest.raises(InputError, match="^in.txt:2: the line has 25 tokens"):
    inference.translate(decoder, tokenizer, source, print, batch_size=8)
  assert [s.tolist() for s in sent] == [[0, 0, 1, 1, 0]]  # The header: error, the end.

  def receive(tree):  # Process 1: it gets what process 0 sent.
    received.append(np.array(tree))
    return sent[0]

  monkeypatch.setattr(inference.multihost_utils, "broadcast_one_to_all", receive)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(InputError, match="^process 0 stopped at an error in the input"):
    inference.translate(decoder, tokenizer, inference.LineSource(NoLines(), "in.txt"), print,
                        batch_size=8)
  assert [r.tolist() for r in received] == [[0] * 5]


class LettersTokenizer:
  """Each character is a token (4 + its code mod 20)."""

  def encode(self, text):
    return [4 + ord(c) % 20 for c in text]


def test_encode_line_appends_eos_keeps_empty_lines_and_cuts_only_when_asked():
  tok = LettersTokenizer()
  assert inference.encode_line(tok, "abc", 16, "f:1") == (tok.encode("abc") + [EOS_ID], False)
  assert inference.encode_line(tok, " \t", 16, "f:1") == ([], False)
  assert inference.encode_line(tok, "z" * 15, 16, "f:1") == (tok.encode("z" * 15) + [EOS_ID],
                                                              False)  # Exactly max_len: kept.
  with pytest.raises(InputError, match="^f:7: the line has 17 tokens"):
    inference.encode_line(tok, "y" * 16, 16, "f:7")
  assert inference.encode_line(tok, "y" * 16, 16, "f:7", truncate=True) == (
      tok.encode("y" * 15) + [EOS_ID], True)


def test_format_translations_plain_and_in_rows():
  best = [[(-0.5, "uno"), (-1.25, "una")], [(0.0, ""), (0.0, "")],
          [(-0.1, "a\u2028b"), (-2.0, "ab")]]
  assert inference.format_translations(4, best) == "uno\n\na b\n"
  assert inference.format_translations(4, best, nbest=2) == (
      "4\t1\tuno\n4\t2\tuna\n5\t1\t\n5\t2\t\n6\t1\ta b\n6\t2\tab\n")
  assert inference.format_translations(0, best[:1], scores=True) == "0\t1\t-0.5\tuno\n"
  score = float(np.float32(-1 / 3))
  (row,) = inference.format_translations(0, [[(score, "x")]], scores=True).splitlines()
  assert np.float32(row.split("\t")[2]) == np.float32(score)  # 9 digits: the same float32.


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
  tables = inference.plot_positions(config, out=out)
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
  tables = inference.plot_positions(workdir=workdir, out=out)  # The run's own config.
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

  runs = inference.plot_curves([workdir, other], out=out)
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
