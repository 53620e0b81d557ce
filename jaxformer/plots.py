"""Pictures of the Transformer: attention maps, positional encodings and training curves.

Three things a learner wants to see, each one function that writes an image file:

- `plot_attention(workdir, text)`: translates `text` with beam search, then runs the
  teacher-forced model on (source, translation) and draws the attention weights that the
  attention modules themselves record (`MultiHeadAttention` sows them, `[B, H, T, S]`, into the
  'intermediates' collection when that collection is mutable). Nothing is recomputed here.
- `plot_positions(config, workdir)`: the positional encoding table `[max_len, D]` (the paper's
  sinusoids, or the learned table of a checkpoint) and the dot product between every two
  positions.
- `plot_curves(workdirs)`: loss, learning rate, tokens/s and BLEU against step, read from each
  run's metrics.jsonl, several runs on one figure.

During training, `log_attention_to_tensorboard` puts one attention map (`attention_image`) into
the TensorBoard event files at every evaluation.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas: no display and no
global pyplot state, so this module is safe to import anywhere (training, tests, servers).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxformer import checkpoint, decode
from jaxformer import workdir as workdir_lib
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.errors import InputError
from jaxformer.model.embedding import sinusoidal_table
from jaxformer.model.transformer import LAYERS, Transformer, shift_right
from jaxformer.tokens import EOS_ID, UNK_ID

# --- Figure geometry. Sizes are whole quarter inches, so that inches * DPI is an exact pixel
# count (the Agg canvas truncates a fractional one).
DPI = 100
MIN_PANEL_INCHES = 3.0        # an attention panel is never smaller than this, square.
INCHES_PER_TOKEN = 0.22       # ... and grows with the tokens it labels,
LABEL_INCHES = 1.0            # ... plus room for its tick labels and title.
POSITIONS_PANEL_INCHES = (5.0, 4.0)   # (width, height) of each positional-encoding panel.
CURVES_PANEL_INCHES = (6.0, 4.0)      # (width, height) of each training-curve panel.
ATTENTION_COLORMAP = "viridis"
TABLE_COLORMAP = "RdBu_r"     # signed values (encodings, dot products), centred on zero.
TICK_FONT_SIZE = 7
TITLE_FONT_SIZE = 9

# The rows of the attention figure, top to bottom.
ATTENTION_ROWS = ("cross-attention heads of one layer",
                  "cross-attention per layer (mean over heads)",
                  "encoder self-attention per layer (mean over heads)",
                  "decoder self-attention per layer (mean over heads)")

# The training curves: (panel title, split of the metrics.jsonl lines, metric key).
CURVES = (
    ("loss", (("train", "loss"), ("validation", "loss"))),
    ("learning rate", (("train", "learning_rate"),)),
    ("tokens / s", (("train", "tokens_per_second"),)),
    ("BLEU", (("validation", "bleu"),)),
)
SPLIT_STYLES = {"train": "-", "validation": "--"}
SPLIT_MARKERS = {"train": "", "validation": "o"}


# ---------------------------------------------------------------------------------------------
# Saving figures.
# ---------------------------------------------------------------------------------------------

def _quarter_inches(inches: float) -> float:
  """Rounded up to a whole quarter inch (exact in binary, so inches * DPI is a whole number)."""
  return math.ceil(inches * 4.0) / 4.0


def panel_inches(num_tokens: int) -> float:
  """The side of a square attention panel that labels `num_tokens` tokens on an axis."""
  return max(MIN_PANEL_INCHES, _quarter_inches(INCHES_PER_TOKEN * num_tokens + LABEL_INCHES))


def save_figure(figure: Figure, out: str) -> str:
  """Writes `figure` to `out` (format from the extension, e.g. .png) at DPI; returns `out`."""
  FigureCanvasAgg(figure)
  try:
    figure.savefig(out, dpi=DPI)
  except (OSError, ValueError) as e:  # A missing directory, an unknown extension.
    raise InputError(f"cannot write {out}: {e}") from None
  return out


def figure_to_array(figure: Figure) -> np.ndarray:
  """The pixels of `figure` at DPI: `[height, width, 3]` uint8 (RGB)."""
  figure.set_dpi(DPI)
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.array(canvas.buffer_rgba())[..., :3]


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------

class AttentionMaps(NamedTuple):
  """One sentence pair and every attention weight the model computed for it.

  The target is the model's own translation, with its EOS (unless the search stopped at the
  length limit first); the decoder's query at target
  position t is the one that predicts token t (its input is token t-1, or BOS). Weights are
  float32 probabilities, N layers, H heads, S source and T target tokens.
  """
  source_ids: np.ndarray      # [S] int32 token ids of the source, EOS included.
  target_ids: np.ndarray      # [T] int32 token ids of the translation.
  source_pieces: list[str]    # S subwords of the source, the closing '</s>' included.
  target_pieces: list[str]    # T subwords of the translation.
  decoder_input_pieces: list[str]  # T decoder inputs: '<s>', then the target shifted right.
  translation: str            # the detokenized translation.
  cross: np.ndarray           # [N, H, T, S] decoder queries over the encoder output.
  encoder_self: np.ndarray    # [N, H, S, S] encoder self-attention.
  decoder_self: np.ndarray    # [N, H, T, T] masked decoder self-attention.


def inference_sharding() -> jax.sharding.Sharding:
  """Where parameters for drawing go: the first local device (one sentence needs no more)."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def check_not_empty(text: str) -> None:
  """Raises InputError for an empty or blank text (checked before loading anything)."""
  if not text.strip():
    raise InputError("the text is empty; give a sentence to translate, e.g. --text \"...\"")


def encode_source(tokenizer: Tokenizer, text: str, max_len: int) -> np.ndarray:
  """`text` as source ids with the closing EOS, `[1, S]` int32.

  Raises InputError for an empty text or one longer than `max_len` tokens (EOS included):
  a picture of a truncated sentence would mislead, so it is refused rather than cut.
  """
  check_not_empty(text)
  ids = list(tokenizer.encode(text)) + [EOS_ID]
  if len(ids) > max_len:
    raise InputError(f"the text has {len(ids)} tokens (EOS included), more than this model's "
                     f"model.max_len={max_len}; give a shorter sentence")
  return np.asarray([ids], np.int32)


def pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
  """The subword of each id ('▁' marks a word start); ids past the vocabulary show as unk."""
  return [tokenizer.id_to_piece(i if 0 <= i < tokenizer.vocab_size else UNK_ID)
          for i in map(int, ids)]


@functools.partial(jax.jit, static_argnames="model")
def _teacher_forced_intermediates(model: Transformer, params: Any, inputs: jax.Array,
                                  targets: jax.Array) -> Any:
  """The 'intermediates' collection of one teacher-forced forward pass (the sown weights)."""
  _, variables = model.apply({"params": params}, inputs, targets, mutable=["intermediates"])
  return variables["intermediates"]


def to_host(tree: Any) -> Any:
  """NumPy copies of the arrays of `tree`, also of those spread over several processes (the
  parameters of a multi-host run may be; then every process must call this)."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(copy, tree)


def sown_weights(stack: dict, module: str) -> np.ndarray:
  """Stack the weights one attention module of every layer sowed: `[N, H, Q, K]`.

  `stack` is the intermediates of the encoder or the decoder, `module` 'self_attention' or
  'cross_attention'. Unrolled layers sow under `layers_0` .. `layers_{N-1}`, each `[B, H, Q, K]`;
  a scanned stack (model.scan_layers) sows once under `layers`, `[N, B, H, Q, K]`. B is 1 here.
  """
  if LAYERS in stack:
    return np.asarray(stack[LAYERS][module]["attention_weights"][0])[:, 0]
  names = sorted((k for k in stack if k.startswith(LAYERS + "_")),
                 key=lambda k: int(k.rsplit("_", 1)[1]))
  return np.stack([np.asarray(stack[k][module]["attention_weights"][0])[0] for k in names])


def attention_maps(model: Transformer, params: Any, tokenizer: Tokenizer, text: str, *,
                   beam_size: int, alpha: float, max_extra_len: int) -> AttentionMaps:
  """Translates `text` with beam search, then records the model's attention on the pair.

  1. `decode.decode_batch` finds the best translation (with its EOS, unless the search hit
     the length limit first).
  2. The teacher-forced model runs once on (source, translation) with the 'intermediates'
     collection mutable, so each attention module sows its softmax weights.
  Raises InputError for an empty text or one that does not fit the model.
  """
  inputs = encode_source(tokenizer, text, model.config.max_len)
  result = decode.decode_batch(model, params, inputs, beam_size=beam_size, alpha=alpha,
                               max_extra_len=max_extra_len, max_len=model.config.max_len)
  tokens, lengths = to_host((result.tokens, result.lengths))
  target_ids = tokens[0, 0, :int(lengths[0, 0])].astype(np.int32)
  intermediates = to_host(_teacher_forced_intermediates(model, params, inputs, target_ids[None]))
  return AttentionMaps(
      source_ids=inputs[0],
      target_ids=target_ids,
      source_pieces=pieces(tokenizer, inputs[0]),
      target_pieces=pieces(tokenizer, target_ids),
      decoder_input_pieces=pieces(tokenizer, np.asarray(shift_right(target_ids[None]))[0]),
      translation=tokenizer.decode(target_ids.tolist()),
      cross=sown_weights(intermediates["decoder"], "cross_attention"),
      encoder_self=sown_weights(intermediates["encoder"], "self_attention"),
      decoder_self=sown_weights(intermediates["decoder"], "self_attention"))


def check_layer(layer: int, num_layers: int) -> int:
  """`layer` as an index in 0..N-1 (negative counts from the top, -1 = the last layer)."""
  if not -num_layers <= layer < num_layers:
    raise InputError(f"--layer {layer} does not exist; the model has {num_layers} layers "
                     f"(0..{num_layers - 1}, or -1 for the last)")
  return layer % num_layers


def draw_heatmap(ax, weights: np.ndarray, x_labels: Sequence[str], y_labels: Sequence[str],
                 title: str, x_name: str = "", y_name: str = ""):
  """One attention matrix `[Q, K]` on `ax`: keys along x, queries along y, weights in [0, 1]."""
  image = ax.imshow(weights, cmap=ATTENTION_COLORMAP, vmin=0.0, vmax=1.0, aspect="auto",
                    interpolation="nearest")
  ax.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=TICK_FONT_SIZE)
  ax.set_yticks(range(len(y_labels)), y_labels, fontsize=TICK_FONT_SIZE)
  ax.set_xlabel(x_name, fontsize=TICK_FONT_SIZE)
  ax.set_ylabel(y_name, fontsize=TICK_FONT_SIZE)
  ax.set_title(title, fontsize=TITLE_FONT_SIZE)
  return image


def attention_grid(maps: AttentionMaps) -> tuple[int, int]:
  """(rows, columns) of panels in the attention figure: one row per ATTENTION_ROWS entry,
  max(H, N) columns."""
  num_layers, num_heads = maps.cross.shape[:2]
  return len(ATTENTION_ROWS), max(num_heads, num_layers)


def draw_attention(maps: AttentionMaps, layer: int = -1) -> Figure:
  """The attention figure, one square panel per matrix (see ATTENTION_ROWS):

  row 1: every head of cross-attention layer `layer` (target queries over source keys);
  row 2: cross-attention of each layer, averaged over heads;
  row 3: encoder self-attention of each layer, averaged over heads;
  row 4: masked decoder self-attention of each layer, averaged over heads. Its keys are the
         decoder inputs (BOS, then the target shifted right); the causal mask leaves the upper
         triangle empty.
  A decoder query is labelled with the token it predicts.
  """
  num_layers, num_heads = maps.cross.shape[:2]
  layer = check_layer(layer, num_layers)
  rows, columns = attention_grid(maps)
  side = panel_inches(max(len(maps.source_pieces), len(maps.target_pieces)))
  figure = Figure(figsize=(columns * side, rows * side), dpi=DPI, layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False)
  src, tgt, dec = maps.source_pieces, maps.target_pieces, maps.decoder_input_pieces
  # (weights [Q, K], key labels, query labels, title, key axis name, query axis name)
  panels = [
      [(maps.cross[layer, h], src, tgt, f"cross-attention\nlayer {layer}, head {h}", "source",
        "target") for h in range(num_heads)],
      [(maps.cross[i].mean(axis=0), src, tgt, f"cross-attention\nlayer {i}, mean of heads",
        "source", "target") for i in range(num_layers)],
      [(maps.encoder_self[i].mean(axis=0), src, src,
        f"encoder self-attention\nlayer {i}, mean of heads", "source", "source")
       for i in range(num_layers)],
      [(maps.decoder_self[i].mean(axis=0), dec, tgt,
        f"decoder self-attention (masked)\nlayer {i}, mean of heads", "decoder input", "target")
       for i in range(num_layers)],
  ]
  image = None
  for row, row_panels in enumerate(panels):
    for column in range(columns):
      if column < len(row_panels):
        image = draw_heatmap(axes[row, column], *row_panels[column])
      else:
        axes[row, column].set_axis_off()
  figure.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
  figure.suptitle(f"{' '.join(src)}  ->  {' '.join(tgt)}", fontsize=TITLE_FONT_SIZE + 1)
  return figure


def plot_attention(workdir: str, text: str, step: int | str | None = None,
                   out: str = "attention.png", layer: int = -1) -> AttentionMaps:
  """Translates `text` with a checkpoint of `workdir` and draws its attention (`draw_attention`)
  to `out`. Returns the weights it drew. Decoding uses the run's config.decode settings."""
  check_not_empty(text)
  run = checkpoint.load_for_inference(workdir, step, sharding=inference_sharding())
  check_layer(layer, run.config.model.num_layers)
  d = run.config.decode
  maps = attention_maps(run.model, run.params, run.tokenizer, text, beam_size=d.beam_size,
                        alpha=d.alpha, max_extra_len=d.max_extra_len)
  save_figure(draw_attention(maps, layer), out)
  return maps


def attention_image(maps: AttentionMaps, layer: int = -1) -> np.ndarray:
  """One picture for TensorBoard: cross-attention of `layer`, mean over heads, labelled.

  Returns `[height, width, 3]` uint8 pixels.
  """
  layer = check_layer(layer, maps.cross.shape[0])
  side = panel_inches(max(len(maps.source_pieces), len(maps.target_pieces)))
  figure = Figure(figsize=(side + 1.0, side), dpi=DPI, layout="constrained")
  ax = figure.subplots()
  image = draw_heatmap(ax, maps.cross[layer].mean(axis=0), maps.source_pieces,
                       maps.target_pieces, f"cross-attention layer {layer}, mean of heads",
                       "source", "target")
  figure.colorbar(image, ax=ax)
  return figure_to_array(figure)


def log_attention_to_tensorboard(writer: Any, step: int, model: Transformer, params: Any,
                                 tokenizer: Tokenizer, source_text: str, config: Any) -> None:
  """Writes the attention map of `source_text` (`attention_image`) and its translation to
  TensorBoard, as `validation/attention` and `validation/attention_translation`.

  For the training loop's evaluation. Every process calls it (the parameters may be sharded
  over all of them); the writer writes on process 0 only. A text that does not fit the model
  is reported on stderr and skipped: a picture must never stop a training run.
  """
  d = config.decode
  try:
    maps = attention_maps(model, params, tokenizer, source_text, beam_size=d.beam_size,
                          alpha=d.alpha, max_extra_len=d.max_extra_len)
  except InputError as e:
    if jax.process_index() == 0:
      print(f"warning: no attention image at step {step}: {e}", file=sys.stderr)
    return
  writer.write_image(step, "validation/attention", attention_image(maps))
  writer.write_text(step, "validation/attention_translation",
                    f"{source_text} -> {maps.translation}")


# ---------------------------------------------------------------------------------------------
# Positional encodings.
# ---------------------------------------------------------------------------------------------

POSITION_STACKS = ("encoder", "decoder")  # each has its own learned table.
POSITIONS_MODULE, POSITIONS_PARAM = "positions", "pos_embedding"


def position_tables(config: Any, workdir: str | None = None, step: int | str | None = None
                    ) -> dict[str, np.ndarray]:
  """{name: table `[max_len, D]`} to draw for `config.model`.

  Sinusoidal: the one fixed table. Learned: the encoder's and the decoder's tables from the
  checkpoint of `workdir` (InputError without one; CheckpointError when it does not match).
  """
  m = config.model
  if m.pos_encoding == "sinusoidal":
    return {"sinusoidal": sinusoidal_table(m.max_len, m.d_model)}
  if workdir is None:
    raise InputError("model.pos_encoding='learned': the table is learned, so it comes from a "
                     "checkpoint; give --workdir of a trained run")
  params, step, _ = checkpoint.load_params(workdir, step=step,
                                           sharding=inference_sharding())
  tables = {}
  for stack in POSITION_STACKS:
    try:
      table = np.asarray(params[stack][POSITIONS_MODULE][POSITIONS_PARAM])
    except KeyError:
      raise checkpoint.CheckpointError(
          f"the checkpoint {step} in {workdir} has no learned positions ({stack}/"
          f"{POSITIONS_MODULE}/{POSITIONS_PARAM}); was it trained with "
          "model.pos_encoding='sinusoidal'? Drop --config to use the run's own config") from None
    if table.shape != (m.max_len, m.d_model):
      raise checkpoint.CheckpointError(
          f"the learned positions in {workdir} are {table.shape}, the config says "
          f"[{m.max_len}, {m.d_model}] (model.max_len, model.d_model); drop --config to use "
          "the run's own config")
    tables[f"learned {stack} (step {step})"] = table
  return tables


def position_similarity(table: np.ndarray) -> np.ndarray:
  """The dot product of every two positions' encodings: `[L, D]` -> `[L, L]`."""
  table = table.astype(np.float64)
  return table @ table.T


def draw_positions(tables: dict[str, np.ndarray]) -> Figure:
  """One row per table: the table as a heatmap (position x dimension) and its similarity."""
  width, height = POSITIONS_PANEL_INCHES
  figure = Figure(figsize=(2 * width, len(tables) * height), dpi=DPI, layout="constrained")
  axes = figure.subplots(len(tables), 2, squeeze=False)
  for row, (name, table) in enumerate(tables.items()):
    limit = float(np.abs(table).max()) or 1.0
    image = axes[row, 0].imshow(table, cmap=TABLE_COLORMAP, vmin=-limit, vmax=limit,
                                aspect="auto", interpolation="nearest")
    axes[row, 0].set(title=f"{name}: encoding [position, dimension]", xlabel="dimension",
                     ylabel="position")
    figure.colorbar(image, ax=axes[row, 0])
    similarity = position_similarity(table)
    limit = float(np.abs(similarity).max()) or 1.0
    image = axes[row, 1].imshow(similarity, cmap=TABLE_COLORMAP, vmin=-limit, vmax=limit,
                                interpolation="nearest")
    axes[row, 1].set(title=f"{name}: dot product between positions", xlabel="position",
                     ylabel="position")
    figure.colorbar(image, ax=axes[row, 1])
  return figure


def plot_positions(config: Any = None, workdir: str | None = None, out: str = "positions.png",
                   step: int | str | None = None) -> dict[str, np.ndarray]:
  """Draws the positional encodings of `config` (default: the run config of `workdir`) to
  `out`; a learned table comes from `workdir`'s checkpoint. Returns the tables drawn."""
  if config is None:
    if workdir is None:
      raise InputError("give a config (--config EXPERIMENT) or a trained run (--workdir DIR)")
    config = workdir_lib.read_run_config(workdir)
    if config is None:
      raise checkpoint.CheckpointError(
          f"{os.path.join(workdir, workdir_lib.CONFIG_FILE)} is missing; give --config "
          "EXPERIMENT, or the workdir of a run")
  tables = position_tables(config, workdir, step)
  save_figure(draw_positions(tables), out)
  return tables


# ---------------------------------------------------------------------------------------------
# Training curves.
# ---------------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def read_metrics(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """The records of a metrics.jsonl file, and one 'path:line: why' per line that was skipped.

  A record is a JSON object with an integer 'step' and a string 'split'. Within a valid
  record, the values of the curves' metrics must be finite numbers; others are dropped and
  reported (the writer stores NaN and infinity as strings). Raises InputError when the file
  does not exist or cannot be read.
  """
  try:
    lines = epath.Path(path).read_text(encoding="utf-8").splitlines()  # Local or gs://.
  except FileNotFoundError:
    raise InputError(f"{path} does not exist; train first (jaxformer train --workdir ...), "
                     "which writes it") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"cannot read {path}: {e}") from None
  plotted = {key for _, series in CURVES for _, key in series}
  records, problems = [], []
  for number, line in enumerate(lines, start=1):
    where = f"{path}:{number}"
    if not line.strip():
      problems.append(f"{where}: empty line")
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
      continue
    if not isinstance(record, dict):
      problems.append(f"{where}: not a JSON object")
      continue
    step, split = record.get("step"), record.get("split")
    if not isinstance(step, int) or isinstance(step, bool):
      problems.append(f"{where}: no valid 'step' (a whole number), got {step!r}")
      continue
    if not isinstance(split, str):
      problems.append(f"{where}: no valid 'split' (e.g. 'train'), got {split!r}")
      continue
    for key in sorted(plotted & set(record)):
      if not _is_number(record[key]):
        problems.append(f"{where}: {key}={record[key]!r} is not a finite number")
        del record[key]
    records.append(record)
  return records, problems


def curve_series(records: list[dict[str, Any]], split: str, key: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` in the `split` records, by step. When a step appears more than
  once (a resumed run logs its last steps again), the later line wins. Negative steps (an
  evaluation of an averaged checkpoint, `jaxformer evaluate`) are not training steps: left out.
  """
  by_step = {r["step"]: r[key] for r in records
             if r["split"] == split and key in r and r["step"] >= 0}
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def run_names(workdirs: Sequence[str]) -> list[str]:
  """A legend name per workdir: its last path component, or the whole path if that repeats."""
  short = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(short)) == len(short):
    return short
  return [os.path.normpath(w) for w in workdirs]


def draw_curves(runs: dict[str, list[dict[str, Any]]]) -> Figure:
  """The CURVES panels (2 x 2); one colour per run, solid train and dashed validation lines."""
  width, height = CURVES_PANEL_INCHES
  columns = 2
  rows = math.ceil(len(CURVES) / columns)
  figure = Figure(figsize=(columns * width, rows * height), dpi=DPI, layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
  for ax, (title, series) in zip(axes, CURVES):
    drawn = False
    for name, records in runs.items():
      for split, key in series:
        steps, values = curve_series(records, split, key)
        if len(steps):
          ax.plot(steps, values, color=colors[name], linestyle=SPLIT_STYLES.get(split, ":"),
                  marker=SPLIT_MARKERS.get(split, ""), markersize=3)
          drawn = True
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    if not drawn:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  for ax in axes[len(CURVES):]:
    ax.set_axis_off()
  handles = [Line2D([], [], color=colors[name], label=name) for name in runs]
  handles += [Line2D([], [], color="gray", linestyle=SPLIT_STYLES[s], marker=SPLIT_MARKERS[s],
                     markersize=3, label=s) for s in SPLIT_STYLES]
  axes[0].legend(handles=handles, fontsize=TICK_FONT_SIZE + 1)
  return figure


def plot_curves(workdirs: Sequence[str], out: str = "curves.png") -> dict[str, list[dict]]:
  """Draws the training curves of every workdir's metrics.jsonl on one figure to `out`.

  Lines that cannot be read are reported on stderr, one 'file:line: why' each, and the valid
  ones are still drawn. Returns {run name: valid records}. InputError when no workdir is
  given, a metrics file is missing, or no file holds a single valid record.
  """
  if not workdirs:
    raise InputError("give at least one --workdir")
  runs = {}
  for name, workdir in zip(run_names(workdirs), workdirs):
    records, problems = read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
    for problem in problems:
      print(f"warning: skipped {problem}", file=sys.stderr)
    runs[name] = records
  if not any(runs.values()):
    raise InputError(f"no valid metrics in {', '.join(workdirs)}; nothing to draw")
  save_figure(draw_curves(runs), out)
  return runs
