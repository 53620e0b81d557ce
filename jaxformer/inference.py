"""Using a trained run: its parameters, its model, evaluation, averaging and pictures.

Everything that reads a workdir to do something with what was trained:

- `load_params`: only the parameters (no optimizer state) of a step or of an averaged
  checkpoint, onto the devices of this process (or given shardings), with the run's config;
  `load_for_inference` adds the model and the vocabulary (`InferenceRun`).
- `average_checkpoints`: the element-wise mean of the parameters of the last K checkpoints (up
  to a given step, or the best), as the paper did (last 5 for base, last 20 for big), saved as
  a new checkpoint.
- `evaluate_checkpoint`: jaxformer.evaluate's metrics of a split, on an evaluation-only
  placement (parameters replicated over a mesh of the devices, batches split over it; no
  optimizer, whatever strategy the run trained with).
- `translate`: the lines of a file or a stream, chunk by chunk as they are read, decoded on every
  device of every process (process 0 reads and writes): the best translation of each line, or
  its n best with their scores.
- `plot_attention`, `plot_positions`, `plot_curves`: the `jaxformer plot` commands, which get the
  arrays (jaxformer.attention_maps, a checkpoint's tables, metrics.jsonl) and draw them with
  jaxformer.plots; `log_attention_to_tensorboard`, the training loop's attention image.

jaxformer.checkpoint reads and writes the checkpoint directories; this module decides what to
read and what to do with it. It knows nothing of training (no import of jaxformer.train).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import attention_maps as attention_lib
from jaxformer import checkpoint, decode, evaluate, objective
from jaxformer import devices as devices_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import text as text_lib
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.decode import MIN_LENGTH_BUCKET, power_of_two  # Shared with interop.stablehlo.
from jaxformer.errors import CheckpointError, InputError, JaxformerError
from jaxformer.log import log
from jaxformer.model.embedding import sinusoidal_table
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID, PAD_ID

PyTree = Any


# --- A trained run's parameters and model. ---------------------------------------------------

def load_params(workdir: str, step: int | str | None = None, sharding: Any = None
                ) -> tuple[PyTree, int | str, ml_collections.FrozenConfigDict]:
  """The parameters of a checkpoint, for evaluation and translation: (params, step, config).

  `step` is a saved step (int, or its digits as a string), None for the newest, 'best' for the
  best step `checkpoint.keep_best` kept (`checkpoint.best_step`), or the name of an averaged
  checkpoint as `average_checkpoints` wrote it (e.g. 'last5_1000-5000', also accepted as
  'averaged/last5_1000-5000'); the returned `step` is that int (the step 'best' names) or
  name. Only the parameters are read (no optimizer state). They land on `sharding`: by default
  on every device of every process, on `run_mesh(config)` (split over its fsdp groups as in
  training when the run used fsdp); or one `jax.sharding.Sharding` for every leaf; or a pytree
  of them shaped like the params; whatever devices, strategy or fsdp the run trained with.
  `config` is the run's recorded config.json.
  """
  workdir = workdir_lib.absolute_workdir(workdir)
  if not workdir_lib.path(workdir).is_dir():
    raise CheckpointError(f"workdir {workdir} does not exist")
  ckpt_dir, label = checkpoint.checkpoint_dir(workdir, step)
  run_config = workdir_lib.read_run_config(workdir)
  if run_config is None:
    raise CheckpointError(f"{workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)} is missing; "
                          "the model cannot be rebuilt without the config the run was trained "
                          "with")
  if sharding is None:  # Read on the host, then placed as the run's own mesh would hold them.
    params = checkpoint.restore_params(ckpt_dir, label, workdir)
    mesh = run_mesh(run_config)
    return devices_lib.place(params, devices_lib.param_shardings(mesh, params)), label, run_config
  return checkpoint.restore_params(ckpt_dir, label, workdir, sharding), label, run_config


def run_mesh(config: Any) -> Mesh:
  """The mesh on which a run's parameters are used: every device of every process, with the
  run's `parallel.fsdp` groups when they divide the devices."""
  return devices_lib.inference_mesh(config.parallel.fsdp)


class InferenceRun(NamedTuple):
  """What translating, evaluating or drawing with a checkpoint needs."""
  model: Transformer
  params: PyTree
  config: ml_collections.FrozenConfigDict
  tokenizer: Tokenizer
  step: int | str


def load_for_inference(workdir: str, step: int | str | None = None, sharding: Any = None
                       ) -> InferenceRun:
  """The model, parameters, config and vocabulary of a checkpoint in `workdir`.

  `step` and `sharding` are those of `load_params`. Raises CheckpointError saying what to do
  when the workdir does not exist or the checkpoint is missing or damaged, DataError when the
  vocabulary is missing.
  """
  workdir_lib.check_run_dir(workdir)
  workdir = workdir_lib.absolute_workdir(workdir)
  try:
    params, step, config = load_params(workdir, step=step, sharding=sharding)
  except checkpoint.DamagedCheckpointError as e:
    raise CheckpointError(f"{e}; choose another with --step "
                          f"({checkpoint.available(workdir)})") from None
  tokenizer = Tokenizer.load(workdir_lib.path(workdir, workdir_lib.VOCAB_FILE))
  return InferenceRun(Transformer(config=config.model), params, config, tokenizer, step)


def parallel_decoder(run: InferenceRun, beam_size: int | None = None,
                     alpha: float | None = None, max_extra_len: int | None = None
                     ) -> decode.ParallelDecoder:
  """A decoder of `run` (loaded by load_for_inference with the default placement) on every
  device of every process; None settings are the run's `decode.*` ones."""
  d = run.config.decode
  return decode.ParallelDecoder(
      run.model, run.params, run_mesh(run.config),
      beam_size=d.beam_size if beam_size is None else beam_size,
      alpha=d.alpha if alpha is None else alpha,
      max_extra_len=d.max_extra_len if max_extra_len is None else max_extra_len,
      max_len=run.config.model.max_len)


def export_run(workdir: str, step: int | str | None, fmt: str, out: str,
               quantize: str | None = None) -> str:
  """Writes the checkpoint `step` of `workdir` in format `fmt` (jaxformer.interop.EXPORT_MODULES)
  into the new directory `out`, all or nothing; returns `out`."""
  from jaxformer import interop
  module = importlib.import_module(f"jaxformer.interop.{interop.EXPORT_MODULES[fmt]}")
  if quantize is not None and quantize not in interop.QUANTIZATIONS.get(fmt, ()):
    raise InputError(f"--quantize {quantize} is not offered for --format {fmt} (offered: "
                     f"{dict((f, q) for f, q in interop.QUANTIZATIONS.items())})")
  workdir_lib.check_new_dir(out, "--out")
  run = load_for_inference(workdir, step, sharding=inference_sharding())
  run = run._replace(params=jax.device_get(run.params))
  with workdir_lib.written_whole(out) as scratch:
    module.export(run, scratch, quantize)
  return out


def import_run(fmt: str, source: str, workdir: str) -> str:
  """Makes the model directory `source` (format `fmt`, jaxformer.interop.IMPORT_MODULES) a
  jaxformer workdir at the new directory `workdir`, all or nothing; returns `workdir`."""
  from jaxformer import interop
  module = importlib.import_module(f"jaxformer.interop.{interop.IMPORT_MODULES[fmt]}")
  if not os.path.isdir(source):
    raise InputError(f"--from {source} is not a directory; give the directory of a saved model "
                     "(for hf: what save_pretrained wrote)")
  workdir_lib.check_new_dir(workdir, "--workdir")
  with workdir_lib.written_whole(workdir) as scratch:
    module.import_model(source, scratch)
  return workdir


def inference_sharding() -> jax.sharding.Sharding:
  """Where parameters for drawing go: the first local device (one sentence needs no more)."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --- Translating files and streams. -----------------------------------------------------------

EMPTY_SCORE = 0.0      # the score of an empty line's translation (empty too): log P = 0.
# Each chunk's header, sent by process 0 before the chunk's ids: lines in it, their width, the
# input ended with it, process 0 met an input error, lines of it cut to max_len.
HEADER = ("lines", "width", "ended", "error", "truncated")


class LineSource(NamedTuple):
  """The input of `translate`, read on process 0 only.

  `open()` gives its lines one at a time (jaxformer.data.text.iter_lines or file_lines); `name`
  is what messages call it ('in.txt', 'stdin'); `check_first`: every line is read and checked
  once before the first is translated (a file, which can be read twice), so that a line that
  cannot be translated stops the command before anything is written.
  """
  open: Callable[[], Iterable[str]]
  name: str
  check_first: bool = False


class TranslateReport(NamedTuple):
  """What `translate` did, the same on every process."""
  lines: int      # input lines translated (empty ones included)
  truncated: int  # of them cut to the model's max_len (truncate=True)


def encode_line(tokenizer: Tokenizer, text: str, max_len: int, where: str,
                truncate: bool = False) -> tuple[list[int], bool]:
  """(source ids, whether they were cut) of one line: tokenizer.encode(text) + [EOS], or [] for
  an empty (or blank) line.

  A line of more than max_len tokens (EOS included) is an InputError naming `where` ('in.txt:3')
  and its token count; with `truncate` it is cut to its first max_len - 1 tokens and EOS.
  """
  if not text.strip():
    return [], False
  ids = list(tokenizer.encode(text)) + [EOS_ID]
  if len(ids) <= max_len:
    return ids, False
  if not truncate:
    raise InputError(f"{where}: the line has {len(ids)} tokens (EOS included), more than the "
                     f"model's max_len={max_len}; shorten it, or pass --truncate to cut such "
                     "lines to max_len")
  return ids[:max_len - 1] + [EOS_ID], True


def _source_chunks(source: LineSource, tokenizer: Tokenizer, max_len: int, batch_size: int,
                   truncate: bool) -> Iterator[tuple[np.ndarray, bool, int]]:
  """Process 0's chunks of `source`: (ids [n, W] int32, PAD-padded, W a power of two; whether
  the input ended with this chunk; how many of its lines were cut), n <= batch_size lines each,
  an empty line a row of PAD. A line is read only when its chunk is being filled."""
  def encoded():
    for number, text in enumerate(source.open(), start=1):
      yield encode_line(tokenizer, text, max_len, f"{source.name}:{number}", truncate)

  if source.check_first:
    for _ in encoded():
      pass
  lines = encoded()
  while True:
    chunk = list(itertools.islice(lines, batch_size))
    width = power_of_two(max((len(ids) for ids, _ in chunk), default=0), MIN_LENGTH_BUCKET,
                         max_len)
    padded = np.full((len(chunk), width), PAD_ID, np.int32)
    for row, (ids, _) in enumerate(chunk):
      padded[row, :len(ids)] = ids
    ended = len(chunk) < batch_size  # islice stopped early: nothing more to read.
    yield padded, ended, sum(cut for _, cut in chunk)
    if ended:
      return


def _shared_chunks(local: Iterator[tuple[np.ndarray, bool, int]] | None
                   ) -> Iterator[tuple[np.ndarray, int]]:
  """Every chunk of the input, (ids [n, W], lines cut), on every process, in input order.

  Process 0 reads them from `local` (None on the others) and broadcasts each: a fixed-shape
  header (HEADER) first, then the ids. An input error that process 0 meets is broadcast too:
  process 0 raises it and every other process an InputError, so that none is left waiting for
  a chunk that will not come.
  """
  while True:
    header, ids, failure = np.zeros(len(HEADER), np.int32), None, None
    if local is not None:
      try:
        ids, ended, cut = next(local)
        header[:] = (*ids.shape, ended, 0, cut)
      except JaxformerError as e:
        header[:], failure = (0, 0, 1, 1, 0), e
    lines, width, ended, error, cut = multihost_utils.broadcast_one_to_all(header).tolist()
    if failure is not None:
      raise failure
    if error:
      raise InputError("process 0 stopped at an error in the input (its own error line says "
                       "which)")
    if lines:
      if ids is None:
        ids = np.zeros((lines, width), np.int32)
      yield multihost_utils.broadcast_one_to_all(ids), cut
    if ended:
      return


def _decode_chunk(decoder: decode.ParallelDecoder, tokenizer: Tokenizer, ids: np.ndarray,
                  nbest: int, max_rows: int) -> list[list[tuple[float, str]]]:
  """The `nbest` best (score, text) of each line of `ids` [n, W], best first.

  The lines are decoded in groups of one power-of-two width (their PAD beyond it cut), each
  group padded with filler rows to a power-of-two row count (at most max_rows), so that the
  same few shapes are compiled once and reused by every chunk. An empty line (all PAD) is not
  decoded: its nbest hypotheses are empty texts scored EMPTY_SCORE.
  """
  lengths = np.sum(ids != PAD_ID, axis=1)
  widths = [power_of_two(n, MIN_LENGTH_BUCKET, decoder.max_len) if n else 0 for n in lengths]
  best = [[(EMPTY_SCORE, "")] * nbest for _ in range(len(ids))]
  for width in sorted(set(widths) - {0}):
    rows = [i for i, w in enumerate(widths) if w == width]
    inputs = np.full((power_of_two(len(rows), 1, max_rows), width), PAD_ID, np.int32)
    inputs[:len(rows)] = ids[rows, :width]
    inputs[len(rows):, 0] = EOS_ID  # Filler rows: an empty sentence each, dropped below.
    result = decoder(inputs)
    for row, i in enumerate(rows):
      best[i] = [(float(result.scores[row, k]),
                  tokenizer.decode(result.tokens[row, k, :result.lengths[row, k]].tolist()))
                 for k in range(nbest)]
  return best


def format_translations(first: int, best: Sequence[Sequence[tuple[float, str]]],
                        nbest: int | None = None, scores: bool = False) -> str:
  """The output lines of a chunk of `best` ((score, text) per line, best first) whose first line
  is line `first` (0-based) of the input.

  Plain (no nbest, no scores): the best text of each line, one line each. Otherwise one row per
  hypothesis, `index<TAB>rank<TAB>score<TAB>text`: the line's 0-based index in the input, rank
  1 to nbest (1 without nbest), the length-normalised log-probability with 9 significant digits
  (it reads back as the same float32), and the text, last; without `scores` no score column.
  Every text is kept on one line (jaxformer.data.text.one_line).
  """
  if nbest is None and not scores:
    return "".join(text_lib.one_line(hypotheses[0][1]) + "\n" for hypotheses in best)
  rows = []
  for index, hypotheses in enumerate(best, start=first):
    for rank, (score, text) in enumerate(hypotheses[:nbest or 1], start=1):
      columns = [str(index), str(rank)] + ([format(score, ".9g")] if scores else [])
      rows.append("\t".join(columns + [text_lib.one_line(text)]) + "\n")
  return "".join(rows)


def translate(decoder: decode.ParallelDecoder, tokenizer: Tokenizer, source: LineSource,
              write: Callable[[str], None], *, batch_size: int, nbest: int | None = None,
              scores: bool = False, truncate: bool = False) -> TranslateReport:
  """Translates the lines of `source` chunk by chunk, on every device of every process.

  Process 0 reads `batch_size` lines at a time (encode_line: a line longer than the model's
  max_len is an InputError unless `truncate`), sends their ids to the other processes, every
  process decodes them (`_decode_chunk`), and process 0 calls `write` with the chunk's output
  lines (`format_translations`) as soon as the chunk is done, in input order. Memory holds one
  chunk, whatever the size of the input; a chunk of 1 answers each line as it comes.

  Every process calls it alike (a pod runs one program): only process 0 reads `source` and
  calls `write`. An input error (a line that does not fit, bytes that are not UTF-8) raises
  InputError on every process: before anything is written when `source.check_first`, else when
  its line is read (the chunks before it are written). `nbest` is at most the beam size.
  """
  if nbest is not None and not 1 <= nbest <= decoder.beam_size:
    raise InputError(f"--nbest {nbest} is more than the beam size, {decoder.beam_size}; ask for "
                     f"at most {decoder.beam_size} or raise --beam-size")
  first = devices_lib.is_first_process()
  local = (_source_chunks(source, tokenizer, decoder.max_len, batch_size, truncate) if first
           else None)
  lines = truncated = 0
  for ids, cut in _shared_chunks(local):
    best = _decode_chunk(decoder, tokenizer, ids, nbest or 1, batch_size)
    if first:
      write(format_translations(lines, best, nbest, scores))
    lines, truncated = lines + len(ids), truncated + cut
  return TranslateReport(lines, truncated)


# --- Averaging. -------------------------------------------------------------------------------

def _mean_params(workdir: str, steps: Sequence[int]) -> PyTree:
  """The element-wise mean of the parameters of `steps`, accumulated in float64 on the host and
  returned in the parameters' own dtype."""
  def read(step):
    ckpt_dir, _ = checkpoint.checkpoint_dir(workdir, step)
    return checkpoint.restore_params(ckpt_dir, step, workdir)  # NumPy, in host memory.

  first = read(steps[0])
  shapes = checkpoint.flat_shapes(first)
  total = jax.tree.map(lambda x: x.astype(np.float64), first)
  for step in steps[1:]:
    params = read(step)
    if checkpoint.flat_shapes(params) != shapes:
      mismatch = checkpoint.describe_mismatch(checkpoint.flat_shapes(params), shapes)
      raise CheckpointError(f"cannot average step {step} with step {steps[0]}: {mismatch}")
    total = jax.tree.map(lambda t, x: t + x, total, params)
  return jax.tree.map(lambda t, x: (t / len(steps)).astype(x.dtype), total, first)


def _last_steps(workdir: str, last_k: int, up_to: int | str | None) -> list[int]:
  """The `last_k` newest saved steps at or before `up_to` (a saved step, 'best', or None for
  the newest), oldest first; CheckpointError when there are fewer."""
  steps = checkpoint.saved_steps(workdir)
  if last_k < 1:
    raise CheckpointError(f"--last {last_k}: average at least 1 checkpoint")
  which, count = "", ""
  if up_to is not None:
    _, up_to = checkpoint.checkpoint_dir(workdir, up_to)  # The step 'best' names; or an error.
    if not isinstance(up_to, int):
      raise CheckpointError(f"--step {up_to}: average checkpoints up to a saved step or "
                            f"{checkpoint.BEST!r}, not an averaged checkpoint")
    steps = [s for s in steps if s <= up_to]
    which, count = f" up to step {up_to}", " at or before it"
  if last_k > len(steps):
    directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR)
    raise CheckpointError(f"cannot average the last {last_k} checkpoints{which}: {directory} "
                          f"has {len(steps)}{count} (steps: {checkpoint.steps_text(steps)})")
  return steps[-last_k:]


def average_checkpoints(workdir: str, last_k: int, up_to: int | str | None = None) -> str:
  """Averages the parameters of the last `last_k` checkpoints into a new one; returns its path.

  The last `last_k` saved steps up to and including `up_to` (a saved step, or 'best': the step
  `checkpoint.best_step` names), by default the newest. The mean is element-wise, accumulated
  in float64 on the host and stored in the parameters' own dtype. The result goes to
  `<workdir>/averaged/last<K>_<first>-<last>` (e.g. `last5_1000-5000`: the 5 steps 1000 to
  5000), written atomically by orbax with the same layout as a training checkpoint's parameters
  (plus `info/` naming the steps); pass that name as `load_params(workdir,
  step='last5_1000-5000')` (`--step last5_1000-5000` on the command line). The original
  checkpoints are only read. Raises CheckpointError when there are fewer than `last_k` saved
  steps up to `up_to`, when `up_to` is not a saved step, or when that averaged checkpoint
  already exists.
  """
  workdir_lib.check_run_dir(workdir)
  workdir = workdir_lib.absolute_workdir(workdir)
  chosen = _last_steps(workdir, last_k, up_to)
  out = checkpoint.averaged_path(workdir, chosen)
  if out.exists():
    raise CheckpointError(f"{out} already exists; it is never overwritten (delete it yourself "
                          "to recompute it)")
  directory = str(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))
  checkpoint.save_averaged(out, _mean_params(workdir, chosen), chosen, source=directory)
  return str(out)


# --- Evaluating a checkpoint. -----------------------------------------------------------------

def evaluation_step(config: Any, model: Transformer, params: PyTree
                    ) -> tuple[PyTree, Callable[[dict], dict]]:
  """An evaluation-only placement of `model`: (params on the devices, eval_step).

  The parameters are replicated over a mesh of every device (of every process), or of one
  device when `eval.batch_size` does not divide their number; `eval_step(host_batch)` splits
  this process's rows of a batch (`eval.batch_size / process_count`, the BATCH_KEYS arrays)
  over the mesh and returns the global metric sums of objective.forward_sums, without dropout.
  No optimizer and no training batch: whatever strategy the run trained with.
  """
  devices = jax.devices()
  if config.eval.batch_size % len(devices):
    devices = devices[:1]
  mesh = devices_lib.make_mesh(devices)  # The training mesh's axes; nothing split over fsdp.
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(devices_lib.MESH_AXES))  # [B, L]: rows over all.
  sums = jax.jit(functools.partial(objective.forward_sums, model=model,
                                   label_smoothing=config.train.label_smoothing,
                                   dropout_rng=None),
                 in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  params = jax.device_put(params, replicated)

  def eval_step(host_batch: dict) -> dict:
    batch = {key: jax.make_array_from_process_local_data(
        batch_sharding, np.asarray(host_batch[key], np.int32),
        (config.eval.batch_size,) + host_batch[key].shape[1:]) for key in objective.BATCH_KEYS}
    return sums(params, batch)

  return params, eval_step


def evaluate_checkpoint(config, params, *, tokenizer, data_dir: str, split: str,
                        beam_size: int | None = None, alpha: float | None = None,
                        num_samples: int = 0, max_examples: int | None = None,
                        keep_hypotheses: bool = False) -> dict[str, Any]:
  """`evaluate.evaluate` for restored parameters, on every device that fits the batch.

  The checkpoint may come from any strategy and device count: see `evaluation_step`.
  `max_examples` and `keep_hypotheses` are those of `evaluate.evaluate`.
  """
  model = Transformer(config=config.model)
  decoding_params = params  # On run_mesh(config), as load_params places them.
  params, eval_step = evaluation_step(config, model, params)
  return evaluate.evaluate(
      config, tokenizer=tokenizer, data_dir=data_dir, split=split, eval_step=eval_step,
      translate_fn=evaluate.make_translate_fn(model, decoding_params, run_mesh(config), config,
                                              beam_size, alpha),
      num_samples=num_samples, max_examples=max_examples, keep_hypotheses=keep_hypotheses)


# --- Pictures. --------------------------------------------------------------------------------

def plot_attention(workdir: str, text: str, step: int | str | None = None,
                   out: str = "attention.png", layer: int = -1) -> attention_lib.AttentionMaps:
  """Translates `text` with a checkpoint of `workdir` and draws its attention
  (`plots.draw_attention`) to `out`. Returns the weights it drew. Decoding uses the run's
  config.decode settings."""
  from jaxformer import plots  # Imported here: matplotlib takes 0.3 s to load.
  attention_lib.check_not_empty(text)
  run = load_for_inference(workdir, step, sharding=inference_sharding())
  plots.check_layer(layer, run.config.model.num_layers)
  d = run.config.decode
  maps = attention_lib.attention_maps(run.model, run.params, run.tokenizer, text,
                                      beam_size=d.beam_size, alpha=d.alpha,
                                      max_extra_len=d.max_extra_len)
  plots.save_figure(plots.draw_attention(maps, layer), out)
  return maps


def log_attention_to_tensorboard(writer: Any, step: int, model: Transformer, params: Any,
                                 tokenizer: Tokenizer, source_text: str, config: Any) -> None:
  """Writes the attention map of `source_text` (`plots.attention_image`) and its translation to
  TensorBoard, as `validation/attention` and `validation/attention_translation`.

  For the training loop's evaluation. Every process calls it (the parameters may be sharded
  over all of them); the writer writes on process 0 only. A text that does not fit the model
  is reported on stderr and skipped: a picture must never stop a training run.
  """
  from jaxformer import plots  # Imported here: matplotlib takes 0.3 s to load.
  d = config.decode
  try:
    maps = attention_lib.attention_maps(model, params, tokenizer, source_text,
                                        beam_size=d.beam_size, alpha=d.alpha,
                                        max_extra_len=d.max_extra_len)
  except InputError as e:
    log(f"warning: no attention image at step {step}: {e}")
    return
  writer.write_image(step, "validation/attention", plots.attention_image(maps))
  writer.write_text(step, "validation/attention_translation",
                    f"{source_text} -> {maps.translation}")


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
    return {"sinusoidal": sinusoidal_table(m.max_len, m.d_model, m.sinusoid_layout)}
  if workdir is None:
    raise InputError("model.pos_encoding='learned': the table is learned, so it comes from a "
                     "checkpoint; give --workdir of a trained run")
  params, step, _ = load_params(workdir, step=step, sharding=inference_sharding())
  tables = {}
  for stack in POSITION_STACKS:
    try:
      table = np.asarray(params[stack][POSITIONS_MODULE][POSITIONS_PARAM])
    except KeyError:
      raise CheckpointError(
          f"the checkpoint {step} in {workdir} has no learned positions ({stack}/"
          f"{POSITIONS_MODULE}/{POSITIONS_PARAM}); was it trained with "
          "model.pos_encoding='sinusoidal'? Drop --config to use the run's own config") from None
    if table.shape != (m.max_len, m.d_model):
      raise CheckpointError(
          f"the learned positions in {workdir} are {table.shape}, the config says "
          f"[{m.max_len}, {m.d_model}] (model.max_len, model.d_model); drop --config to use "
          "the run's own config")
    tables[f"learned {stack} (step {step})"] = table
  return tables


def plot_positions(config: Any = None, workdir: str | None = None, out: str = "positions.png",
                   step: int | str | None = None) -> dict[str, np.ndarray]:
  """Draws the positional encodings of `config` (default: the run config of `workdir`) to
  `out`; a learned table comes from `workdir`'s checkpoint. Returns the tables drawn."""
  from jaxformer import plots  # Imported here: matplotlib takes 0.3 s to load.
  if config is None:
    if workdir is None:
      raise InputError("give a config (--config EXPERIMENT) or a trained run (--workdir DIR)")
    workdir_lib.check_run_dir(workdir)
    config = workdir_lib.read_run_config(workdir)
    if config is None:
      raise CheckpointError(
          f"{os.path.join(workdir, workdir_lib.CONFIG_FILE)} is missing; give --config "
          "EXPERIMENT, or the workdir of a run")
  tables = position_tables(config, workdir, step)
  plots.save_figure(plots.draw_positions(tables), out)
  return tables


def plot_curves(workdirs: Sequence[str], out: str = "curves.png") -> dict[str, list[dict]]:
  """Draws the training curves of every workdir's metrics.jsonl on one figure to `out`.

  Lines that cannot be read are reported on stderr, one 'file:line: why' each, and the valid
  ones are still drawn. Returns {run name: valid records}. InputError when no workdir is
  given, a metrics file is missing, or no file holds a single valid record.
  """
  from jaxformer import plots  # Imported here: matplotlib takes 0.3 s to load.
  if not workdirs:
    raise InputError("give at least one --workdir")
  runs = {}
  for name, workdir in zip(plots.run_names(workdirs), workdirs):
    workdir_lib.check_run_dir(workdir)
    # The path as the user wrote it, in messages ('./runs/x/metrics.jsonl').
    records, problems = plots.read_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE))
    for problem in problems:
      log(f"warning: skipped {problem}")
    runs[name] = records
  if not any(runs.values()):
    raise InputError(f"no valid metrics in {', '.join(workdirs)}; nothing to draw")
  plots.save_figure(plots.draw_curves(runs), out)
  return runs
