"""Regenerates every picture of docs/tour.md into docs/images/.

  python docs/make_tour_images.py                    # uses runs/default, training it first
                                                     # if it has no checkpoint (the default
                                                     # experiment: a few minutes on a CPU)
  python docs/make_tour_images.py --workdir DIR      # a trained run of the default experiment

Three pictures are the `jaxformer plot` commands (curves, positions, attention), made by the
same functions (jaxformer/inference.py, drawing with jaxformer/plots.py). The others show one
idea each with the model's own modules and functions: the embedding table, LayerNorm against
BatchNorm, the masks, teacher forcing and beam search.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from jaxformer import attention_maps, decode, inference, plots  # noqa: E402
from jaxformer import config as config_lib  # noqa: E402
from jaxformer import workdir as workdir_lib  # noqa: E402
from jaxformer.model import attention  # noqa: E402
from jaxformer.model.embedding import PositionalEncoding, TokenEmbedding  # noqa: E402
from jaxformer.model.transformer import shift_right  # noqa: E402
from jaxformer.tokens import EOS_ID, PAD_ID  # noqa: E402
from jaxformer.train import jax_internals  # noqa: E402

IMAGES = os.path.join(ROOT, "docs", "images")
EXPERIMENT = "default"
# The sentence of the attention, teacher-forcing and beam-search pictures, and its reference.
SENTENCE = "three thousand four hundred twenty-one"
REFERENCE = "tres mil cuatrocientos veintiuno"
# Short sentences batched together for the masks and the normalization pictures.
BATCH_A = ("seven hundred", "twelve", "nine thousand eighty-one")
BATCH_B = ("seven hundred", "five", "sixty thousand")
# Number words whose embeddings are compared (English and their Spanish translations).
WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")


FEATURES_SHOWN = 32  # of D, in the normalization picture.


def ensure_trained(workdir: str) -> None:
  """Trains the default experiment in `workdir` unless it already has a checkpoint."""
  if os.path.isdir(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)) and os.listdir(
      os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)):
    return
  from jaxformer.train import loop
  print(f"training the {EXPERIMENT!r} experiment into {workdir} (a few minutes on a CPU)")
  loop.train_and_evaluate(config_lib.load_config(EXPERIMENT), workdir)


def padded_batch(tokenizer, texts) -> np.ndarray:
  """Source ids `[B, S]` of `texts`, each closed by EOS, padded to the longest."""
  rows = [tokenizer.encode(t) + [EOS_ID] for t in texts]
  batch = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
  for i, ids in enumerate(rows):
    batch[i, :len(ids)] = ids
  return batch


# --- The pictures that are not `jaxformer plot` commands. -------------------------------------

def embeddings_figure(run: inference.InferenceRun) -> Figure:
  """Cosine similarity of the learned embeddings of English and Spanish number words."""
  ids = [run.tokenizer.encode(w) for w in WORDS]
  keep = [(w, i[0]) for w, i in zip(WORDS, ids) if len(i) == 1]  # words that are one piece.
  table = run.params["shared_embedding"]["embed"]["embedding"]
  vectors = np.asarray(table)[[i for _, i in keep]]
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  figure = Figure(figsize=(6.5, 5.5), layout="constrained")
  ax = figure.subplots()
  image = ax.imshow(vectors @ vectors.T, cmap=plots.TABLE_COLORMAP, vmin=-1, vmax=1)
  labels = [w for w, _ in keep]
  ax.set_xticks(range(len(labels)), labels, rotation=90)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_title("cosine similarity of learned token embeddings")
  figure.colorbar(image, ax=ax)
  return figure


def normalization_figure(run: inference.InferenceRun) -> Figure:
  """LayerNorm and BatchNorm of the same sentence in two batches (embeddings + positions)."""
  cfg = run.config.model

  def embedded(texts):  # [B, S, D]: token embedding * sqrt(D) + positional encoding.
    ids = jnp.asarray(padded_batch(run.tokenizer, texts))
    x = TokenEmbedding(cfg).apply({"params": run.params["shared_embedding"]}, ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return x + PositionalEncoding(cfg).apply({}, positions), ids

  def layer_norm(x):  # each token over its D features (scale 1, bias 0: no learned part).
    norm = nn.LayerNorm()
    return norm.apply(norm.init(jax.random.key(0), x), x)

  def batch_norm(x):  # each feature over every token of the batch, padding included.
    norm = nn.BatchNorm(use_running_average=False)
    flat = x.reshape(-1, x.shape[-1])
    out, _ = norm.apply(norm.init(jax.random.key(0), flat), flat, mutable=["batch_stats"])
    return out.reshape(x.shape)

  (x_a, ids), (x_b, _) = embedded(BATCH_A), embedded(BATCH_B)
  length = int((ids[0] != PAD_ID).sum())  # The first sentence, the same in both batches.
  first = lambda x: np.asarray(x)[0, :length, :FEATURES_SHOWN]  # noqa: E731
  layer_a, layer_b = first(layer_norm(x_a)), first(layer_norm(x_b))
  batch_a, batch_b = first(batch_norm(x_a)), first(batch_norm(x_b))
  panels = [
      ("input: embedding + position", first(x_a)),
      (f"LayerNorm, batch A or B\n(max |A - B| = {np.abs(layer_a - layer_b).max():.2g})",
       layer_a),
      ("BatchNorm in batch A", batch_a),
      ("BatchNorm in batch B", batch_b),
      (f"BatchNorm A - B\n(max |A - B| = {np.abs(batch_a - batch_b).max():.2g})",
       batch_a - batch_b),
  ]
  figure = Figure(figsize=(15, 3.75), layout="constrained")
  axes = figure.subplots(1, len(panels))
  pieces = attention_maps.pieces(run.tokenizer, ids[0, :length])
  for ax, (title, values) in zip(axes, panels):
    image = ax.imshow(values, cmap=plots.TABLE_COLORMAP, vmin=-3, vmax=3, aspect="auto")
    ax.set_yticks(range(length), pieces)
    ax.set_xlabel(f"feature (first {FEATURES_SHOWN})")
    ax.set_title(title, fontsize=plots.TITLE_FONT_SIZE + 1)
  figure.colorbar(image, ax=axes)
  figure.suptitle(f"the sentence {BATCH_A[0]!r}, batched with {list(BATCH_A[1:])} (A) or "
                  f"{list(BATCH_B[1:])} (B)")
  return figure


def masks_figure(run: inference.InferenceRun) -> Figure:
  """The boolean masks of a padded batch, for its shortest sentence (True = may attend)."""
  source = padded_batch(run.tokenizer, BATCH_A)
  target = padded_batch(run.tokenizer, ("setecientos", "doce", "nueve mil ochenta y uno"))
  decoder_inputs = shift_right(jnp.asarray(target))
  row = 1  # "twelve" -> "doce": the most padding.
  src = attention_maps.pieces(run.tokenizer, source[row])
  dec = attention_maps.pieces(run.tokenizer, np.asarray(decoder_inputs)[row])
  panels = [
      ("encoder self-attention\n(padding)", attention.encoder_self_mask(source), src, src),
      ("decoder self-attention\n(causal and padding)", attention.decoder_self_mask(decoder_inputs),
       dec, dec),
      ("cross-attention\n(padding)", attention.cross_mask(decoder_inputs, source), src, dec),
  ]
  figure = Figure(figsize=(12, 4.25), layout="constrained")
  for ax, (title, mask, keys, queries) in zip(figure.subplots(1, len(panels)), panels):
    ax.imshow(np.asarray(mask)[row, 0], cmap="Greys_r", vmin=0, vmax=1)
    ax.set_xticks(range(len(keys)), keys, rotation=90)
    ax.set_yticks(range(len(queries)), queries)
    ax.set(title=title, xlabel="key", ylabel="query")
  figure.suptitle("masks of the sentence 'twelve' -> 'doce' in a padded batch "
                  "(white: may attend)")
  return figure


def teacher_forcing_figure(run: inference.InferenceRun) -> Figure:
  """Teacher forcing: at every position the decoder reads the reference so far (shifted right)
  and predicts the next reference token; the bars are the probability it gives that token."""
  source = padded_batch(run.tokenizer, [SENTENCE])
  target = padded_batch(run.tokenizer, [REFERENCE])
  logits = run.model.apply({"params": run.params}, source, target)  # [1, T, V]
  probs = np.asarray(jax.nn.softmax(logits[0], axis=-1))
  inputs = attention_maps.pieces(run.tokenizer, np.asarray(shift_right(jnp.asarray(target)))[0])
  wanted = attention_maps.pieces(run.tokenizer, target[0])
  best = attention_maps.pieces(run.tokenizer, probs.argmax(-1))
  p_wanted = probs[np.arange(len(wanted)), target[0]]
  figure = Figure(figsize=(8, 4), layout="constrained")
  ax = figure.subplots()
  ax.bar(range(len(wanted)), p_wanted, color="C0")
  for t, (p, guess) in enumerate(zip(p_wanted, best)):
    ax.text(t, p + 0.02, f"argmax\n{guess}", ha="center", fontsize=plots.TICK_FONT_SIZE)
  ax.set_xticks(range(len(wanted)), [f"{i}\n-> {w}" for i, w in zip(inputs, wanted)])
  ax.set(ylim=(0, 1.2), ylabel="P(reference token)",
         title=f"teacher forcing\n{SENTENCE!r} -> {REFERENCE!r}",
         xlabel="decoder input -> token to predict")
  return figure


def beam_figure(run: inference.InferenceRun) -> Figure:
  """The beam's hypotheses and their length-normalized scores, beside greedy search."""
  d = run.config.decode
  source = padded_batch(run.tokenizer, [SENTENCE])
  rows = []
  for beam_size in (1, d.beam_size):
    result = decode.decode_batch(run.model, run.params, source, beam_size=beam_size,
                                 alpha=d.alpha, max_extra_len=d.max_extra_len)
    for j in range(beam_size):
      length = int(result.lengths[0, j])
      text = run.tokenizer.decode(np.asarray(result.tokens[0, j, :length]).tolist())
      search = "greedy" if beam_size == 1 else f"beam {j + 1}/{beam_size}"
      rows.append((search, text, float(result.scores[0, j])))
  scores = [score for _, _, score in rows]
  figure = Figure(figsize=(9, 3.5), layout="constrained")
  ax = figure.subplots()
  ax.barh(range(len(rows)), scores, color=["C1"] + ["C0"] * (len(rows) - 1))
  for y, (_, text, score) in enumerate(rows):
    label = ax.text(0.02 * -min(scores), y, f"{text}   ({score:.3f})", va="center",
                    clip_on=True)
    label.set_in_layout(False)  # A long hypothesis is cut at the frame, not squeezing it.
  ax.set_yticks(range(len(rows)), [search for search, _, _ in rows])
  ax.set_xlim(1.1 * min(scores), -1.6 * min(scores))
  ax.axvline(0.0, color="black", linewidth=0.8)
  ax.invert_yaxis()
  ax.set(xlabel=f"score = log P(y) / ((5 + |y|) / 6)^{d.alpha}  (higher is better; bars left "
         "of 0)", title=f"beam search on {SENTENCE!r}")
  return figure


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", EXPERIMENT))
  args = parser.parse_args()
  jax_internals.install()  # As every entry point does, before the first compilation.
  os.makedirs(IMAGES, exist_ok=True)
  ensure_trained(args.workdir)
  run = inference.load_for_inference(args.workdir, sharding=inference.inference_sharding())
  inference.plot_curves([args.workdir], out=os.path.join(IMAGES, "curves.png"))
  inference.plot_positions(run.config, out=os.path.join(IMAGES, "positions.png"))
  inference.plot_attention(args.workdir, SENTENCE, out=os.path.join(IMAGES, "attention.png"))
  for name, make in (("embeddings.png", embeddings_figure),
                     ("normalization.png", normalization_figure),
                     ("masks.png", masks_figure),
                     ("teacher_forcing.png", teacher_forcing_figure),
                     ("beam_search.png", beam_figure)):
    plots.save_figure(make(run), os.path.join(IMAGES, name))
  for name in sorted(os.listdir(IMAGES)):
    print(f"docs/images/{name}: {os.path.getsize(os.path.join(IMAGES, name)) // 1024} KB")


if __name__ == "__main__":
  main()
