"""Evaluation over a whole split: loss, token accuracy, exact match, BLEU and chrF.

Two passes over the split (or over its first `max_examples` examples), both distributed over
every device of every process:
1. teacher-forced: the eval step sums the cross entropy and the correct tokens of
   every real target token (filler rows of the last batch are all padding and count nothing);
2. decoding: beam search (or greedy) translates every source sentence; the detokenized
   hypotheses are compared with the raw reference text: exact match, and corpus BLEU and chrF
   by sacrebleu (their signatures are reported so scores can be compared across papers).

The training loop's periodic evaluation calls the same `evaluate` with a cap on how many
sentences are decoded; `jaxformer evaluate` decodes all of them (and may keep them, to write
them out). Where the work runs is the caller's: `evaluate` takes an `eval_step` and a
`translate_fn`, which the training loop builds from its strategy and
jaxformer.inference.evaluate_checkpoint from an evaluation-only placement.

A whole evaluation may take minutes (beam search over a model that does not stop yet). The
caller may pass `should_stop`: it is asked before every batch of both passes, and when it says
so (on any process) `evaluate` raises `EvaluationStopped` on every process at the same batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from jaxformer import decode
from jaxformer import objective
from jaxformer.data import pipeline

Batch = dict[str, np.ndarray]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
  """Corpus BLEU of detokenized hypotheses against raw references, and sacrebleu's signature."""
  metric = sacrebleu.metrics.BLEU()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return float(score.score), str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
  """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2) of detokenized hypotheses
  against raw references, and sacrebleu's signature."""
  metric = sacrebleu.metrics.CHRF()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return float(score.score), str(metric.get_signature())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Share of hypotheses equal to their reference, ignoring surrounding and repeated spaces."""
  same = [" ".join(h.split()) == " ".join(r.split()) for h, r in zip(hypotheses, references)]
  return float(np.mean(same)) if same else 0.0


class EvaluationStopped(Exception):
  """`evaluate` stopped between two batches because its `should_stop` asked it to.

  Not a user error: the caller (the training loop, on a signal) decides what it means. No
  metrics are computed for the split.
  """

  def __init__(self, split: str, stage: str, done: int, total: int):
    super().__init__(f"the evaluation of {split} stopped after {done} of {total} {stage} "
                     "batches")
    self.split, self.stage, self.done, self.total = split, stage, done, total


StopFn = Callable[[], bool]


def stop_agreed(should_stop: StopFn | None) -> bool:
  """Whether to stop before the next batch: whether `should_stop()` is True on any process.

  Call it on every process before every batch, with should_stop None on all or on none. With
  several processes the flags are gathered (one allgather of a bool per batch, little next to
  a batch of beam search), so that all stop at the same batch: a process that stopped alone
  would leave the others waiting in the gather of `translate_batches` or in a collective of
  the eval step.
  """
  if should_stop is None:
    return False
  stop = bool(should_stop())
  if jax.process_count() > 1:
    stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
  return stop


def _gather_from_processes(tree: Any) -> Any:
  """Concatenates each process's arrays along axis 0 (a no-op in a one-process run)."""
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree)  # [processes, ...]
  return jax.tree.map(lambda x: np.reshape(x, (-1,) + x.shape[2:]), gathered)


def teacher_forced_metrics(eval_step: Callable[[Batch], dict], batches: Sequence[Batch],
                           should_stop: StopFn | None = None, split: str = "the split"
                           ) -> dict[str, float]:
  """Per-token loss (label-smoothed, as in training), accuracy and perplexity of a split.

  EvaluationStopped when `should_stop` (asked before each batch, see `stop_agreed`) says so.
  """
  sums: dict[str, float] = {}
  for number, batch in enumerate(batches):
    if stop_agreed(should_stop):
      raise EvaluationStopped(split, "teacher-forced", number, len(batches))
    for key, value in jax.device_get(eval_step(batch)).items():
      sums[key] = sums.get(key, 0.0) + float(value)
  metrics = {k: float(v) for k, v in objective.normalize_metrics(sums).items()}
  metrics["num_tokens"] = int(metrics["num_tokens"])
  return metrics


def translate_batches(translate_fn: Callable[[np.ndarray], np.ndarray], tokenizer,
                      batches: Sequence[Batch], width: int, should_stop: StopFn | None = None,
                      split: str = "the split") -> dict[int, str]:
  """{example id: detokenized best hypothesis} for the examples of `batches` of every process.

  `translate_fn(inputs [B, S]) -> tokens [B, L]` gives the best hypothesis of each row; `width`
  (>= every L) makes the arrays of all processes the same shape so they can be gathered.
  EvaluationStopped when `should_stop` (asked before each batch, see `stop_agreed`) says so.
  """
  ids, tokens = [], []
  for number, batch in enumerate(batches):
    if stop_agreed(should_stop):
      raise EvaluationStopped(split, "decoding", number, len(batches))
    best = np.asarray(jax.device_get(translate_fn(batch["inputs"])))
    tokens.append(np.pad(best, ((0, 0), (0, width - best.shape[1]))))
    ids.append(batch["example_ids"])
  if not ids:
    return {}
  ids, tokens = _gather_from_processes((np.concatenate(ids), np.concatenate(tokens)))
  return {int(i): tokenizer.decode(t.tolist()) for i, t in zip(ids, tokens) if i >= 0}


def evaluate(config, *, tokenizer, data_dir: str, split: str, eval_step, translate_fn,
             max_decode_examples: int | None = None, num_samples: int = 0,
             should_stop: StopFn | None = None, max_examples: int | None = None,
             keep_hypotheses: bool = False) -> dict[str, Any]:
  """Every metric of `split` as one flat dict (plus a few sample translations if asked).

  `max_examples` limits both passes to the first that many examples of the split (`examples`
  in the metrics says how many were evaluated, `decoded_examples` how many decoded: fewer with
  `max_decode_examples`). With `keep_hypotheses`, `hypotheses` holds the detokenized best
  hypothesis of every decoded example, in the split's order (on every process).
  `should_stop() -> bool`, when given (on every process), is asked before every batch; when it
  is True on any process, every process raises EvaluationStopped at that batch.
  """
  per_host_batch = config.eval.batch_size // jax.process_count()
  batches = list(pipeline.make_eval_batches(config, tokenizer, data_dir, split,
                                            batch_size=per_host_batch,
                                            max_examples=max_examples))
  metrics: dict[str, Any] = {"split": split}
  metrics.update(teacher_forced_metrics(eval_step, batches, should_stop, split))

  references = pipeline.eval_references(config, data_dir, split, max_examples)
  metrics["examples"] = len(references)
  decode_batches = batches
  if max_decode_examples is not None:  # The same number of batches on every process.
    decode_batches = batches[:max(1, math.ceil(max_decode_examples / config.eval.batch_size))]
  translations = translate_batches(translate_fn, tokenizer, decode_batches, config.model.max_len,
                                   should_stop, split)
  order = sorted(translations)
  hypotheses = [translations[i] for i in order]
  targets = [references[i][1] for i in order]
  metrics["exact_match"] = exact_match(hypotheses, targets)
  metrics["bleu"], metrics["bleu_signature"] = bleu(hypotheses, targets)
  metrics["chrf"], metrics["chrf_signature"] = chrf(hypotheses, targets)
  metrics["decoded_examples"] = len(order)
  if num_samples:
    metrics["samples"] = [{"source": references[i][0], "reference": references[i][1],
                           "translation": translations[i]} for i in order[:num_samples]]
  if keep_hypotheses:
    metrics["hypotheses"] = hypotheses
  return metrics


def make_translate_fn(model, params, mesh, config, beam_size: int | None = None,
                      alpha: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """This process's inputs [b, S] -> their best hypotheses' tokens [b, L], decoded by every
  device of `mesh` (`params` lie on it), with the config's decoding settings."""
  decoder = decode.ParallelDecoder(
      model, params, mesh, beam_size=config.decode.beam_size if beam_size is None else beam_size,
      alpha=config.decode.alpha if alpha is None else alpha,
      max_extra_len=config.decode.max_extra_len, max_len=config.model.max_len)
  return lambda inputs: decoder.decode_local(inputs).tokens[:, 0]
