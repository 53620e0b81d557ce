"""The training loop: `train_and_evaluate(config, workdir)`.

  check the config and the workdir -> resume or start
  -> for each step: next batch, train step, (log) (evaluate) (checkpoint)
  -> final checkpoint

Everything that can fail because of the user's input (config against the devices, a workdir
whose checkpoints the config does not fit, data files) fails before the first step. Only process
0 writes logs, metrics and event files; every process takes part in checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxformer import checkpoint, evaluate, inference
from jaxformer import devices
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, sources, tokenizer as tokenizer_lib
from jaxformer.data import vocab
from jaxformer.errors import JaxformerError
from jaxformer.model.transformer import Transformer
from jaxformer.train import parallel, preemption, throughput
from jaxformer.train.writer import MetricsWriter

# The loss of every step is checked for NaN or infinity, in one transfer from the devices, at
# each log and checkpoint step, and at least this often (so the check does not stall the
# devices at every step, and the list of losses waiting to be checked stays short).
MAX_UNCHECKED_STEPS = 100


class NonFiniteLossError(JaxformerError):
  """The loss (or the gradient) became NaN or infinite."""


def log(message: str) -> None:
  """One line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _progress(start: int, total: int):
  """A tqdm progress bar on a terminal (process 0), nothing otherwise."""
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _format(metrics: dict[str, Any]) -> str:
  keys = ("loss", "accuracy", "exact_match", "bleu", "learning_rate", "tokens_per_second", "mfu",
          "packing_efficiency", "data_wait_fraction")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _concatenate(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if len(batches) == 1:
    return batches[0]
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _first_non_finite(pending: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
  """(step, metric, value) of the first step whose loss or gradient norm is NaN or infinite."""
  values = jax.device_get([(m["loss"], m["grad_norm"]) for _, m in pending])
  for (step, _), (loss, grad_norm) in zip(pending, values):
    for name, value in (("loss", float(loss)), ("gradient norm", float(grad_norm))):
      if not math.isfinite(value):
        return step, name, value
  return None


def train_and_evaluate(config, workdir: str, restore_step: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint, or from `restore_step`)
  and returns the last validation metrics ({} when there was nothing left to train)."""
  devices.initialize_distributed()
  strategy = parallel.make_strategy(config)  # Checks the config against the devices first.
  workdir_lib.write_run_config(workdir, config)  # Refuses a config its checkpoints do not fit.
  log(f"jaxformer: {jax.process_count()} process(es), {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}), strategy {config.parallel.strategy}")

  tokenizer = vocab.load_or_train(config, workdir)
  data_dir = workdir_lib.resolve_data_dir(config, workdir)
  train_iter = pipeline.make_train_iterator(config, tokenizer, data_dir)
  model = Transformer(config=config.model)

  checkpointer = checkpoint.Checkpointer.from_config(workdir, config)
  writer = MetricsWriter(workdir)
  try:
    restored = checkpointer.restore_or_none(strategy.abstract_state(), train_iter,
                                            restore_step=restore_step)
    if restored is None:
      state = strategy.init_state(jax.random.key(config.train.seed))
      start_step = 0
    else:
      state, start_step = strategy.place_state(restored[0]), restored[1]
      log(f"jaxformer: resumed from the checkpoint at step {start_step}")
    if start_step >= config.train.steps:
      log(f"jaxformer: the checkpoint at step {start_step} already reaches train.steps="
          f"{config.train.steps}; raise --config.train.steps to train on")
      return {}

    peak_flops = config.train.peak_flops or throughput.measure_peak_flops(config.model.dtype)
    step_flops = throughput.train_step_flops(config) * config.train.grad_accum_steps

    def run_evaluation(step: int) -> dict[str, Any]:
      result = evaluate.evaluate(
          config, tokenizer=tokenizer, data_dir=data_dir, split="validation",
          eval_step=lambda batch: strategy.eval_step(state.params,
                                                     strategy.shard_eval_batch(batch)),
          translate_fn=evaluate.make_translate_fn(model, strategy.inference_params(state),
                                                  config),
          max_decode_examples=config.eval.bleu_examples, num_samples=config.eval.num_samples)
      samples = result.pop("samples", [])
      writer.write(step, "validation", result)
      for sample in samples:
        writer.write_text(step, "validation/samples", " | ".join(
            f"{k}: {v}" for k, v in sample.items()))
      if samples:  # One attention map, of the first sample, as an image in TensorBoard.
        inference.log_attention_to_tensorboard(writer, step, model,
                                               strategy.inference_params(state), tokenizer,
                                               samples[0]["source"], config)
      return result

    def check_finite(pending: list[tuple[int, dict[str, Any]]]) -> None:
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

    progress = _progress(start_step, config.train.steps)
    meter = throughput.Throughput()
    eval_metrics: dict[str, Any] = {}
    pending: list[tuple[int, dict[str, Any]]] = []  # (step, metrics) not yet checked for NaN.
    step = start_step
    previous_metrics = None
    with preemption.PreemptionGuard() as guard:
      while step < config.train.steps:
        wait_start = time.perf_counter()
        # One update takes grad_accum_steps pipeline batches (its micro-batches).
        host_batch = _concatenate([next(train_iter)
                                   for _ in range(config.train.grad_accum_steps)])
        data_wait = time.perf_counter() - wait_start
        target_tokens = int(np.count_nonzero(host_batch["targets"]))
        meter.add_step(target_tokens, data_wait,
                            non_pad=target_tokens + int(np.count_nonzero(host_batch["inputs"])),
                            slots=host_batch["inputs"].size + host_batch["targets"].size)
        state, metrics = strategy.train_step(state, strategy.shard_batch(host_batch))
        # At most one step waits behind the running one: wait for the previous step before
        # fetching the next batch. Without this the loop (steps are dispatched asynchronously)
        # runs ahead of the devices, queueing batches on them, and the time it then spends in
        # next() is pipeline time the devices never waited for. With it, data_wait_fraction is
        # time the devices may have waited, while the pipeline's prefetch thread fills its
        # buffer (benchmarks/RESULTS.md).
        if previous_metrics is not None:
          jax.block_until_ready(previous_metrics)
        previous_metrics = metrics
        step += 1
        pending.append((step, metrics))
        if progress is not None:
          progress.update(1)

        last = step == config.train.steps
        # Every process calls these at every step (the hosts agree on preemption through them).
        preempted = guard.should_stop(step)
        saving = checkpointer.should_save(step) or preempted or last
        logging_now = last or step % config.train.log_every_steps == 0
        if saving or logging_now or len(pending) >= MAX_UNCHECKED_STEPS:
          check_finite(pending)  # Never log or save the state of a diverged run.
          pending = []
        if step == start_step + 1 and not logging_now:
          jax.block_until_ready(metrics)
          meter.restart()  # The first step compiles: that is not training speed.

        if logging_now:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          metrics.update(meter.report(jax.process_count()))
          metrics["mfu"] = step_flops / metrics["step_time"] / (peak_flops * jax.device_count())
          writer.write(step, "train", metrics)
          if progress is not None:
            progress.set_postfix_str(_format(metrics))
          else:
            log(f"step {step}: {_format(metrics)}")

        if (step % config.train.eval_every_steps == 0 or last) and not preempted:
          with meter.paused():  # Evaluation time is not training time.
            eval_metrics = run_evaluation(step)
          log(f"step {step} validation: {_format(eval_metrics)}")

        if saving:  # (Under pmap, checkpoint_state copies the state to the host: only now.)
          checkpointer.save(step, strategy.checkpoint_state(state), train_iter,
                            metrics=eval_metrics, force=True)
        if preempted:
          break
    if progress is not None:
      progress.close()
    checkpointer.wait()
    if step < config.train.steps:
      log(f"jaxformer: stopped by {guard.reason} at step {step}; the checkpoint is saved in "
          f"{checkpointer.directory}. Run the same command to resume.")
    else:
      log(f"jaxformer: trained to step {step}; checkpoints in {checkpointer.directory}")
    return eval_metrics
  finally:
    checkpointer.close()  # Waits for the saves in flight, also when a step failed.
    writer.close()
