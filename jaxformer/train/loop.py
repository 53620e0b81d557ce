"""The training loop: `train_and_evaluate(config, workdir)`.

  set up: join the processes, check the config against the devices, the workdir, the data and
          the source of a fine-tuning run (train.init_from: jaxformer/train/finetune.py), lock
          the workdir
  -> resume, or start: from fresh parameters, or from the source's (saved as step 0); metrics
     of the steps it trains again set aside
  -> for each step: next batch, train step, (NaN check) (log) (evaluate) (checkpoint)
  -> stop at train.steps; or when early stopping's patience runs out (saved, finished:
     jaxformer/train/early_stop.py); or at the step the hosts agreed on after a preemption
     signal, or, when the signal comes during an evaluation, before its next batch (saved)

Everything that can fail because of the user's input (config against the devices, a workdir
that cannot be written, that another trainer holds, or whose checkpoints the config does not
fit; data files) fails before the first step, and the checks that need no writing come before
the first write; right before it, the workdir's lock is taken (one trainer per workdir:
workdir.WorkdirLock). `train_and_evaluate` does the distributed set-up and the device check
itself, once, so that every caller (the CLI, the benchmarks, the tour script) gets them. Only
process 0 writes logs, metrics and event files; every process takes part in checkpoints.

The fixed pieces of a run (strategy, data iterator, checkpointer, writer, ...) are one `_Run`;
the TrainState goes into each helper as an argument and comes back out of it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from jaxformer import checkpoint, evaluate, inference
from jaxformer import devices
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, sources, vocab
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.errors import JaxformerError
from jaxformer.log import log, to_stderr
from jaxformer.model.transformer import Transformer
from jaxformer.train import early_stop as early_stop_lib
from jaxformer.train import finetune, parallel, preemption, throughput
from jaxformer.train.state import TrainState
from jaxformer.train.writer import MetricsWriter

# The loss of every step is checked for NaN or infinity, in one transfer from the devices, at
# each log and checkpoint step, and at least this often (so the check does not stall the
# devices at every step, and the list of losses waiting to be checked stays short).
MAX_UNCHECKED_STEPS = 100

Pending = list[tuple[int, dict[str, Any]]]  # (step, metrics) of steps not yet checked for NaN.


class NonFiniteLossError(JaxformerError):
  """The loss (or the gradient) became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """How a run ended: at train.steps, by early stopping (`stopped_early`), or stopped by a signal
  (`stopped_by`) at `step`."""
  step: int                     # The last step trained (and saved).
  metrics: dict[str, Any]       # The last validation metrics ({} when none were computed).
  stopped_by: str | None = None  # 'SIGTERM', 'SIGINT', 'SIGHUP', 'a preemption notice'.
  stopped_early: bool = False   # The validation metric stopped improving (train.early_stop_*).

  @property
  def finished(self) -> bool:
    """Whether the run is over (at train.steps or stopped early), not waiting for a resume."""
    return self.stopped_by is None


@dataclasses.dataclass(frozen=True)
class _Run:
  """The pieces of one training run that stay the same from step to step."""
  config: ml_collections.ConfigDict
  strategy: parallel.Strategy
  tokenizer: Tokenizer
  data_dir: str
  train_iter: grain.DatasetIterator
  model: Transformer
  checkpointer: checkpoint.Checkpointer
  writer: MetricsWriter
  early_stop: early_stop_lib.EarlyStopping | None = None  # Set once the start step is known.


@dataclasses.dataclass(frozen=True)
class _Due:
  """What the loop does after the step it has just run."""
  preempted: bool  # The hosts agreed to stop at this step: it is saved, not evaluated.
  save: bool
  log: bool
  evaluate: bool
  check: bool      # Check the pending steps for NaN now.
  stop_early: bool = False  # Its evaluation was the last one early stopping waits for.


def train_and_evaluate(config, workdir: str, restore_step: int | None = None) -> TrainResult:
  """Trains `config` in `workdir` (resuming from its newest checkpoint, or from `restore_step`;
  a new run starts from fresh parameters, or from those of `train.init_from`) to train.steps,
  until early stopping finishes it, or until a signal stops it (saved at the step it stopped
  at). Returns how it ended, with the last validation metrics ({} when there was nothing left
  to train)."""
  lock, run = workdir_lib.WorkdirLock(workdir), None  # _set_up takes it before its first write.
  try:
    run, source = _set_up(config, workdir, lock)
    state, start_step = _restore_or_init(run, restore_step, source)
    del source  # Its parameters live on in `state` alone.
    run.writer.start_at(start_step)  # Sets aside the metrics of the steps this run trains again.
    run = dataclasses.replace(run, early_stop=early_stop_lib.EarlyStopping.resume(
        run.config, workdir, start_step))
    done = _nothing_to_train(run, start_step)
    return done if done is not None else _train(run, state, start_step)
  finally:
    _close(run, lock)


def _nothing_to_train(run: _Run, start_step: int) -> TrainResult | None:
  """How the run ended, when it already has: at train.steps, or stopped early."""
  config, early = run.config, run.early_stop
  if start_step >= config.train.steps:
    log(f"jaxformer: the checkpoint at step {start_step} already reaches train.steps="
        f"{config.train.steps}; raise --config.train.steps to train on")
    return TrainResult(step=start_step, metrics={})
  if early is not None and early.exhausted:
    log(f"jaxformer: the run stopped early at step {start_step}: {early.describe()}; raise "
        "train.early_stop_patience (or set it to 0) to train on")
    return TrainResult(step=start_step, metrics={}, stopped_early=True)
  return None


def _train(run: _Run, state: TrainState, start_step: int) -> TrainResult:
  """Trains from `start_step` to train.steps, an early stop or a signal; saves where it ends."""
  config = run.config
  peak_flops = throughput.PeakFlops(config.train.peak_flops, config.model.dtype)
  meter, bar = throughput.Throughput(), _progress(start_step, config.train.steps)
  eval_metrics: dict[str, Any] = {}
  pending: Pending = []
  step, previous_metrics = start_step, None
  with preemption.PreemptionGuard() as guard:
    while step < config.train.steps:
      state, metrics = _train_step(run, state, meter, previous_metrics)
      step, previous_metrics = step + 1, metrics
      pending.append((step, metrics))
      if bar is not None:
        to_stderr(lambda: bar.update(1))
      due = _due(run, guard, step, len(pending))
      if due.check:
        _check_finite(run.checkpointer, pending)  # Never log or save a diverged run's state.
        pending = []
      if step == start_step + 1 and not due.log:
        jax.block_until_ready(metrics)
        meter.restart()  # The first step compiles: that is not training speed.
      if due.log:
        _log_train(run, step, metrics, meter, peak_flops, bar)
      evaluated = None
      if due.evaluate:
        with meter.paused():  # Evaluation time is not training time.
          due, evaluated = _evaluate_due(run, state, step, guard, due)
        eval_metrics = eval_metrics if evaluated is None else evaluated
      if due.save:  # keep_best ranks a step by its own evaluation only, if it had one.
        _save(run, step, state, evaluated or {})
      if due.preempted or due.stop_early:
        break
  if bar is not None:
    to_stderr(bar.close)
  _finish(run, step, guard, due)
  return TrainResult(step=step, metrics=eval_metrics,
                     stopped_by=guard.reason if due.preempted else None,
                     stopped_early=due.stop_early)


# --- Set up and resume. --------------------------------------------------------------------------

def _set_up(config, workdir: str, lock: workdir_lib.WorkdirLock
            ) -> tuple[_Run, finetune.Source | None]:
  """Joins the processes, checks the config against the devices and the workdir, reads the
  source of a fine-tuning run, takes the workdir's `lock`, then opens the run's vocabulary,
  data, checkpoints and metrics (in this order). Returns the run and the source read (None
  unless a new run starts from another run's parameters)."""
  devices.initialize_distributed()
  # Everything that can be checked is checked before the first write: the devices, the
  # workdir, the data, the source to fine-tune from; then the run config (refused when the
  # checkpoints do not fit it).
  strategy = parallel.make_strategy(config)
  data_dir = workdir_lib.resolve_data_dir(config, workdir)
  workdir_lib.check_can_write(workdir)
  sources.check_ready(config, data_dir)
  config, source = finetune.prepare(config, workdir, strategy)  # Records the source resolved.
  lock.acquire()  # One trainer per workdir: a second one stops here, having written nothing.
  workdir_lib.write_run_config(workdir, config)
  log(f"jaxformer: {jax.process_count()} process(es), {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}), strategy {config.parallel.strategy}")
  if source is not None:
    finetune.copy_vocabulary(source, workdir)
  tokenizer = vocab.load_or_train(config, workdir)
  train_iter = pipeline.make_train_iterator(config, tokenizer, data_dir)
  model = Transformer(config=config.model)
  checkpointer = checkpoint.Checkpointer.from_config(workdir, config)
  return _Run(config=config, strategy=strategy, tokenizer=tokenizer, data_dir=data_dir,
              train_iter=train_iter, model=model, checkpointer=checkpointer,
              writer=MetricsWriter(workdir)), source


def _close(run: _Run | None, lock: workdir_lib.WorkdirLock) -> None:
  """Waits for the saves in flight and closes the run's files, also when a step failed; then
  lets another trainer have the workdir (last: it would find the saves unfinished)."""
  try:
    if run is not None:
      run.checkpointer.close()
      run.writer.close()
  finally:
    lock.release()


def _restore_or_init(run: _Run, restore_step: int | None, source: finetune.Source | None
                     ) -> tuple[TrainState, int]:
  """The state to train on and its step: from a checkpoint (it also restores the data
  iterator's position), or a new one at step 0: fresh, or with the parameters of `source`
  (saved at once, as step 0)."""
  restored = run.checkpointer.restore_or_none(run.strategy.abstract_state(), run.train_iter,
                                              restore_step=restore_step)
  if restored is not None:
    state, step = run.strategy.place_state(restored[0]), restored[1]
    log(f"jaxformer: resumed from the checkpoint at step {step}")
    return state, step
  if source is None:
    return run.strategy.init_state(jax.random.key(run.config.train.seed)), 0
  state = finetune.start_state(run.strategy, source.params)
  # The start is the run's first checkpoint: a resume never needs the source again, and
  # (while it is kept) `jaxformer evaluate --step 0` tells how the source does on this data.
  _save(run, 0, state, {})
  log(f"jaxformer: fine-tuning from {source.spec}: its parameters and vocabulary, with a fresh "
      "optimizer state, step, schedule and data position (saved as step 0)")
  return state, 0


# --- One step. -----------------------------------------------------------------------------------

def _train_step(run: _Run, state: TrainState, meter: throughput.Throughput,
                previous_metrics: dict[str, Any] | None) -> tuple[TrainState, dict[str, Any]]:
  """Fetches the next batch, counts it in `meter` and dispatches the step on it; then waits
  for the step before it (`previous_metrics`). Returns the new state and the step's metrics
  (device arrays, not yet fetched)."""
  wait_start = time.perf_counter()
  # One update takes grad_accum_steps pipeline batches (its micro-batches).
  host_batch = _concatenate([next(run.train_iter)
                             for _ in range(run.config.train.grad_accum_steps)])
  data_wait = time.perf_counter() - wait_start
  target_tokens = int(np.count_nonzero(host_batch["targets"]))
  meter.add_step(target_tokens, data_wait,
                 non_pad=target_tokens + int(np.count_nonzero(host_batch["inputs"])),
                 slots=host_batch["inputs"].size + host_batch["targets"].size)
  state, metrics = run.strategy.train_step(state, run.strategy.shard_batch(host_batch))
  # At most one step waits behind the running one: wait for the previous step before
  # fetching the next batch. Without this the loop (steps are dispatched asynchronously)
  # runs ahead of the devices, queueing batches on them, and the time it then spends in
  # next() is pipeline time the devices never waited for. With it, data_wait_fraction is
  # time the devices may have waited, while the pipeline's prefetch thread fills its
  # buffer (benchmarks/RESULTS.md).
  if previous_metrics is not None:
    jax.block_until_ready(previous_metrics)
  return state, metrics


def _concatenate(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if len(batches) == 1:
    return batches[0]
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _due(run: _Run, guard: preemption.PreemptionGuard, step: int, unchecked: int) -> _Due:
  """What is due after `step`, with `unchecked` steps not yet checked for NaN."""
  train = run.config.train
  last = step == train.steps
  # Every process calls these at every step (the hosts agree on preemption through them).
  preempted = guard.should_stop(step)
  save = run.checkpointer.should_save(step) or preempted or last
  log_now = last or step % train.log_every_steps == 0
  return _Due(preempted=preempted, save=save, log=log_now,
              evaluate=(step % train.eval_every_steps == 0 or last) and not preempted,
              check=save or log_now or unchecked >= MAX_UNCHECKED_STEPS)


# --- The NaN check. ------------------------------------------------------------------------------

def _first_non_finite(pending: Pending) -> tuple[int, str, float] | None:
  """(step, metric, value) of the first step whose loss or gradient norm is NaN or infinite."""
  values = jax.device_get([(m["loss"], m["grad_norm"]) for _, m in pending])
  for (step, _), (loss, grad_norm) in zip(pending, values):
    for name, value in (("loss", float(loss)), ("gradient norm", float(grad_norm))):
      if not math.isfinite(value):
        return step, name, value
  return None


def _check_finite(checkpointer: checkpoint.Checkpointer, pending: Pending) -> None:
  """Raises NonFiniteLossError, after the saves in flight are written, if a step diverged."""
  bad = _first_non_finite(pending)
  if bad is None:
    return
  bad_step, name, value = bad
  checkpointer.wait()
  good = checkpointer.latest_step()
  kept = (f"the last good checkpoint is step {good} in {checkpointer.directory}"
          if good is not None else "no checkpoint was saved before it")
  raise NonFiniteLossError(
      f"the training {name} is {value} at step {bad_step}; {kept}. Lower "
      "train.learning_rate or set train.grad_clip_norm, then run again to resume")


# --- Log, evaluate, save, stop. ------------------------------------------------------------------

def _progress(start: int, total: int):
  """A tqdm progress bar on a terminal (process 0), nothing otherwise."""
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  from tqdm import tqdm  # Lazily: only a run on a terminal needs it.
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _format(metrics: dict[str, Any]) -> str:
  keys = ("loss", "accuracy", "exact_match", "bleu", "learning_rate", "tokens_per_second", "mfu",
          "packing_efficiency", "data_wait_fraction")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _log_train(run: _Run, step: int, metrics: dict[str, Any], meter: throughput.Throughput,
               peak_flops: throughput.PeakFlops, bar) -> None:
  """Writes the step's metrics, its speed and MFU; shows them on the progress bar or the log."""
  config = run.config
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  metrics.update(meter.report(jax.process_count()))
  step_flops = throughput.train_step_flops(config) * config.train.grad_accum_steps
  metrics["mfu"], note = peak_flops.mfu(step_flops / metrics["step_time"] / jax.device_count())
  if note:
    log(note)
  run.writer.write(step, "train", metrics)
  if bar is not None:
    to_stderr(lambda: bar.set_postfix_str(_format(metrics)))
  else:
    log(f"step {step}: {_format(metrics)}")


def _evaluate(run: _Run, state: TrainState, step: int, guard: preemption.PreemptionGuard
              ) -> dict[str, Any] | None:
  """Validation metrics of `state`; writes and logs them, the sample translations and, in
  TensorBoard, the attention map of the first sample. None, with nothing written, when a
  signal came during the evaluation: it stops before the next batch (on every process)."""
  config, strategy, model, tokenizer, writer = (run.config, run.strategy, run.model,
                                                run.tokenizer, run.writer)
  log(f"step {step}: evaluating on validation")
  try:
    result = evaluate.evaluate(
        config, tokenizer=tokenizer, data_dir=run.data_dir, split="validation",
        eval_step=lambda batch: strategy.eval_step(state.params,
                                                   strategy.shard_eval_batch(batch)),
        translate_fn=evaluate.make_translate_fn(model, *strategy.decoding_params(state),
                                                config),
        max_decode_examples=config.eval.bleu_examples, num_samples=config.eval.num_samples,
        # The local flag: under jax.distributed's preemption service SIGTERM goes to jax's
        # notifier and never sets it (preemption.py), so such a notice does not interrupt an
        # evaluation; the hosts stop at the step they agree on after it. SIGINT does.
        should_stop=lambda: guard.requested)
  except evaluate.EvaluationStopped as e:
    log(f"step {step}: {e}")
    return None
  log(f"step {step} validation: {_format(result)}")
  samples = result.pop("samples", [])
  writer.write(step, "validation", result)
  for sample in samples:
    writer.write_text(step, "validation/samples", " | ".join(
        f"{k}: {v}" for k, v in sample.items()))
  if samples:  # One attention map, of the first sample, as an image in TensorBoard.
    inference.log_attention_to_tensorboard(writer, step, model,
                                           strategy.inference_params(state),
                                       tokenizer, samples[0]["source"], config)
  return result


def _evaluate_due(run: _Run, state: TrainState, step: int, guard: preemption.PreemptionGuard,
                  due: _Due) -> tuple[_Due, dict[str, Any] | None]:
  """Evaluates `state` (`_evaluate`) and counts it for early stopping. Returns what is due now,
  with the validation metrics: None when a signal came during the evaluation (then the step is
  saved, without metrics, and the run stops); when early stopping's patience has run out, the
  step is saved and the run finishes."""
  evaluated = _evaluate(run, state, step, guard)
  if evaluated is None:
    return dataclasses.replace(due, preempted=True, save=True), None
  if run.early_stop is not None and run.early_stop.add(step, evaluated):
    return dataclasses.replace(due, save=True, stop_early=True), evaluated
  return due, evaluated


def _save(run: _Run, step: int, state: TrainState, eval_metrics: dict[str, Any]) -> None:
  """A checkpoint of `state` and the data iterator's position at `step` (every process)."""
  # Under pmap, checkpoint_state copies the state to the host: only when a save is due.
  run.checkpointer.save(step, run.strategy.checkpoint_state(state), run.train_iter,
                        metrics=eval_metrics, force=True)


def _finish(run: _Run, step: int, guard: preemption.PreemptionGuard, due: _Due) -> None:
  """Waits for the saves in flight, then says why the run ended at `step` (`due` is what was
  due after it) and where its checkpoints are: trained to train.steps, stopped early (also a
  record in metrics.jsonl), or stopped by a signal (maybe during the evaluation of `step`)."""
  checkpointer = run.checkpointer
  checkpointer.wait()
  if due.stop_early:
    run.writer.write(step, early_stop_lib.SPLIT, run.early_stop.record())
    log(f"jaxformer: stopped early at step {step}: {run.early_stop.describe()}; checkpoints in "
        f"{checkpointer.directory}")
    return
  if not due.preempted:
    log(f"jaxformer: trained to step {step}; checkpoints in {checkpointer.directory}")
    return
  log(f"jaxformer: stopped by {guard.reason} at step {step}; the checkpoint is saved in "
      f"{checkpointer.directory}. Run the same command to resume.")
  # Resuming goes on from the next step: an evaluation due at this one is never made up for.
  train = run.config.train
  # Due to evaluate, and preempted: the signal came during the evaluation (`_evaluate_due`).
  interrupted = due.evaluate
  missed = "interrupted" if interrupted else ""
  if not interrupted and (step % train.eval_every_steps == 0 or step == train.steps):
    missed = "skipped"  # The signal came during the step's training: _due left it out.
  if missed:
    log(f"jaxformer: the evaluation of step {step} was {missed}; run it with `jaxformer "
        f"evaluate --workdir {checkpointer.workdir} --step {step} --split validation`")
