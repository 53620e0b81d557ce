"""Early stopping: a run finishes when its validation metric has stopped improving.

With `train.early_stop_patience` = P > 0, the training loop finishes (it saves the step and
exits with status 0) after P evaluations in a row without an improvement of the validation
metric that `checkpoint.keep_best` names (config.validate requires it to be set;
checkpoint.BEST_MODE says whether lower or higher is better). An evaluation improves when its
value is strictly better than that of every earlier evaluation of the run; the first one always
does. The stop is said in the log and in metrics.jsonl, by a record of the split 'early_stop'
that names the metric, its best value and the step that had it.

Resume-safe: when a run starts, the count is derived from the run's own validation records in
metrics.jsonl rather than saved with the checkpoint. That file holds every evaluation up to the
step the run resumes from, whichever step the checkpoint is of (MetricsWriter.start_at sets
aside the records of later steps, which are trained again); the metrics orbax records beside
a checkpoint exist only for a step saved where the run evaluated, and an item of its own in
every checkpoint would change their layout for three numbers. Process 0 writes metrics.jsonl
(the other hosts of a pod may not see it), so it reads the history and shares it; from then on
every process counts the same validation metrics (computed over the whole split, alike on every
process), so all of them stop at the same evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxformer import checkpoint
from jaxformer.train import writer as writer_lib

SPLIT = "early_stop"       # the split of the record saying that the run stopped early.
VALIDATION = "validation"  # the split of the loop's evaluations in metrics.jsonl.
# `jaxformer evaluate --split validation` appends validation records too, marked by this key
# (the checkpoint it evaluated): they are not evaluations of the training run.
EVALUATE_COMMAND_KEY = "checkpoint"


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


@dataclasses.dataclass
class EarlyStopping:
  """The evaluations of a run since the best value of `metric`, and that value."""
  metric: str                    # a key of checkpoint.BEST_MODE: 'loss', 'accuracy', 'bleu'.
  patience: int                  # stop after this many evaluations without an improvement.
  lower_is_better: bool
  best: float | None = None      # the best value so far (None before the first evaluation),
  best_step: int | None = None   # the step that had it,
  since_best: int = 0            # and the evaluations after it, none better.

  @classmethod
  def resume(cls, config: ml_collections.ConfigDict, workdir: str, start_step: int
             ) -> EarlyStopping | None:
    """The count of a run that trains on from `start_step` in `workdir`, from the run's
    evaluations up to that step (metrics.jsonl); None when early stopping is off. Every process
    calls it (process 0 shares what it read)."""
    patience = config.train.early_stop_patience
    if not patience:
      return None
    metric = config.checkpoint.keep_best
    early = cls(metric=metric, patience=patience,
                lower_is_better=checkpoint.BEST_MODE[metric] == "min")
    if jax.process_index() == 0:
      early.replay(writer_lib.read_records(workdir), up_to=start_step)
    if jax.process_count() > 1:
      _share(early)
    return early

  def replay(self, records: list[dict[str, Any]], up_to: int) -> None:
    """Counts the training loop's evaluations among `records` (of metrics.jsonl) of the steps up
    to `up_to`, in step order (the first record of a step, should one appear twice)."""
    values: dict[int, float] = {}
    for record in records:
      value, step = record.get(self.metric), record.get("step")
      if (record.get("split") == VALIDATION and EVALUATE_COMMAND_KEY not in record
          and isinstance(step, int) and 0 <= step <= up_to and _is_number(value)):
        values.setdefault(step, float(value))
    for step in sorted(values):
      self.add(step, {self.metric: values[step]})

  def add(self, step: int, metrics: dict[str, Any]) -> bool:
    """Counts the evaluation of `step`, given its validation `metrics`; returns whether the run
    should stop now (`exhausted`)."""
    value = float(metrics[self.metric])
    better = self.best is None or (value < self.best if self.lower_is_better
                                   else value > self.best)
    if better:
      self.best, self.best_step, self.since_best = value, int(step), 0
    else:
      self.since_best += 1
    return self.exhausted

  @property
  def exhausted(self) -> bool:
    """Whether `patience` evaluations in a row have not improved on the best."""
    return self.since_best >= self.patience

  def describe(self) -> str:
    """'validation loss has not improved for 3 evaluations (best 1.234 at step 200; ...)'."""
    return (f"validation {self.metric} has not improved for {self.since_best} evaluation(s) "
            f"(best {self.best:.6g} at step {self.best_step}; "
            f"train.early_stop_patience={self.patience})")

  def record(self) -> dict[str, Any]:
    """What metrics.jsonl says of the stop (beside its step and the split SPLIT)."""
    return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
            "evaluations_without_improvement": self.since_best, "patience": self.patience}


def _share(early: EarlyStopping) -> None:
  """Sets `early` to process 0's count on every process (a collective)."""
  numbers = np.array([math.nan if early.best is None else early.best,
                      -1 if early.best_step is None else early.best_step,
                      early.since_best], np.float64)
  # As 32-bit words: jax would round float64 to float32, and the best value must stay exact
  # (the next evaluation is compared with it).
  words = np.asarray(multihost_utils.broadcast_one_to_all(numbers.view(np.uint32)))
  best, best_step, since_best = np.ascontiguousarray(words, np.uint32).view(np.float64)
  early.best = None if math.isnan(best) else float(best)
  early.best_step = None if best_step < 0 else int(best_step)
  early.since_best = int(since_best)
