"""Pictures of the Transformer, drawn from arrays: attention maps, positional encodings and
training curves.

Only drawing (NumPy and matplotlib): what is drawn comes in as arrays. The attention weights
come from jaxformer.attention_maps (an `AttentionMaps`), the tables of positional encodings
`[max_len, D]` and the records of metrics.jsonl from jaxformer.inference, which also holds the
`jaxformer plot` commands that put the two together.

- attention: `draw_attention` (every head of one layer's cross-attention and every layer's
  cross, encoder and decoder self-attention), `attention_image` (one panel, as pixels for
  TensorBoard);
- positions: `draw_positions` (each table and the dot product between every two positions);
- curves: `read_metrics`, `curve_series` and `draw_curves` (loss, learning rate, tokens/s and
  BLEU against step, several runs on one figure).

Figures are drawn with matplotlib's object-oriented API on the Agg canvas: no display and no
global pyplot state, so this module is safe to import anywhere (training, tests, servers).
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxformer.errors import InputError

if TYPE_CHECKING:  # Only for annotations: importing it would import jax and the model.
  from jaxformer.attention_maps import AttentionMaps

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


def check_format(out: str) -> None:
  """Refuses, before any drawing, a file name whose extension matplotlib cannot write."""
  formats = FigureCanvasAgg.get_supported_filetypes()
  extension = os.path.splitext(out)[1].lstrip(".").lower()
  if extension not in formats:
    raise InputError(f"cannot write {out}: {extension or 'no extension'} is not an image format; "
                     f"end the name with one of .{', .'.join(sorted(formats))}")


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


# ---------------------------------------------------------------------------------------------
# Positional encodings.
# ---------------------------------------------------------------------------------------------

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
