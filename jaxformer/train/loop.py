"""The training loop: `train_and_evaluate(config, workdir)`.

  resume or start -> for each step: next batch, train step, (log) (evaluate) (checkpoint)
                  -> final checkpoint

Everything that can fail because of the user's input (config against the devices, data files,
a checkpoint that does not fit) fails before the first step. Only process 0 writes logs,
metrics and event files; every process takes part in checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxformer import checkpoint, evaluate
from jaxformer.data import pipeline, sources, tokenizer as tokenizer_lib
from jaxformer.errors import JaxformerError
from jaxformer.model.transformer import Transformer
from jaxformer.train import flops, parallel
from jaxformer.train.writer import MetricsWriter


class NonFiniteLossError(JaxformerError):
  """The loss became NaN or infinite."""


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


def measure_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large matmul on the first device: the denominator of MFU when not configured."""
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return repeats * 2 * size ** 3 / (time.perf_counter() - start)


def _format(metrics: dict[str, Any]) -> str:
  keys = ("loss", "accuracy", "exact_match", "bleu", "learning_rate", "tokens_per_second", "mfu",
          "packing_efficiency", "data_wait_fraction")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _concatenate(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if len(batches) == 1:
    return batches[0]
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def train_and_evaluate(config, workdir: str, restore_step: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns the last
  validation metrics."""
  parallel.initialize_distributed()
  strategy = parallel.make_strategy(config)  # Checks the config against the devices first.
  log(f"jaxformer: {jax.process_count()} process(es), {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}), strategy {config.parallel.strategy}")

  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_run_files(workdir, config)
  tokenizer = tokenizer_lib.load_or_train(config, workdir)
  data_dir = sources.resolve_data_dir(config, workdir)
  train_iter = pipeline.make_train_iterator(config, tokenizer, data_dir)
  model = Transformer(config=config.model)

  checkpointer = checkpoint.Checkpointer.from_config(workdir, config)
  restored = checkpointer.restore_or_none(strategy.abstract_state(), train_iter,
                                          restore_step=restore_step)
  if restored is None:
    state = strategy.init_state(jax.random.key(config.train.seed))
    start_step = 0
  else:
    state, start_step = strategy.place_state(restored[0]), restored[1]
    log(f"jaxformer: resumed from the checkpoint at step {start_step}")

  writer = MetricsWriter(workdir)
  peak_flops = config.train.peak_flops or measure_peak_flops(config.model.dtype)
  step_flops = flops.train_step_flops(config) * config.train.grad_accum_steps
  eval_metrics: dict[str, Any] = {}

  def run_evaluation(step: int, split: str = "validation", max_examples: int | None = None,
                     num_samples: int = 0) -> dict[str, Any]:
    params = strategy.inference_params(state)
    result = evaluate.evaluate(
        config, tokenizer=tokenizer, data_dir=data_dir, split=split,
        eval_step=lambda batch: strategy.eval_step(state.params, strategy.shard_eval_batch(batch)),
        translate_fn=evaluate.make_translate_fn(model, params, config),
        max_decode_examples=max_examples, num_samples=num_samples)
    samples = result.pop("samples", [])
    writer.write(step, split, result)
    for sample in samples:
      writer.write_text(step, f"{split}/samples", " | ".join(
          f"{k}: {v}" for k, v in sample.items()))
    result["samples"] = samples
    return result

  progress = _progress(start_step, config.train.steps)
  guard = checkpoint.PreemptionGuard()
  step = start_step
  window_start, window_step, window_tokens, data_wait = time.perf_counter(), step, 0, 0.0
  window_real, window_slots = 0, 0  # non-pad tokens and all token slots (source + target).
  previous_metrics = None
  with guard:
    while step < config.train.steps:
      wait_start = time.perf_counter()
      # One update takes grad_accum_steps pipeline batches (its micro-batches).
      host_batch = _concatenate([next(train_iter) for _ in range(config.train.grad_accum_steps)])
      data_wait += time.perf_counter() - wait_start
      target_tokens = int(np.count_nonzero(host_batch["targets"]))
      window_tokens += target_tokens
      window_real += target_tokens + int(np.count_nonzero(host_batch["inputs"]))
      window_slots += host_batch["inputs"].size + host_batch["targets"].size
      state, metrics = strategy.train_step(state, strategy.shard_batch(host_batch))
      # At most one step waits behind the running one: before fetching the next batch, wait
      # for the previous step. Without this the loop (steps are dispatched asynchronously) runs
      # ahead of the devices, queueing batches on them, and the time it then spends in next()
      # is pipeline time the devices never waited for. With it, that time (data_wait) is time
      # the devices may have waited, while the pipeline's prefetch thread fills its buffer.
      if previous_metrics is not None:
        jax.block_until_ready(previous_metrics)
      previous_metrics = metrics
      step += 1
      if progress is not None:
        progress.update(1)

      last = step == config.train.steps
      preempted = guard.should_stop(step)  # Every process calls it at every step.
      saving = last or preempted or step % config.checkpoint.every_steps == 0
      logging_now = last or step % config.train.log_every_steps == 0
      if saving or logging_now:  # Never log or save the state of a diverged run.
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
          checkpointer.close()
          raise NonFiniteLossError(
              f"the training loss is {metrics['loss']} at step {step}; the last good "
              f"checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
              "Lower train.learning_rate or set train.grad_clip_norm, then resume")
      if logging_now:
        elapsed = time.perf_counter() - window_start
        steps_done = step - window_step
        metrics["step_time"] = elapsed / steps_done
        metrics["tokens_per_second"] = window_tokens * jax.process_count() / elapsed
        metrics["data_wait_fraction"] = data_wait / elapsed
        metrics["packing_efficiency"] = window_real / window_slots  # share of non-pad tokens
        metrics["mfu"] = step_flops / metrics["step_time"] / (peak_flops * jax.device_count())
        writer.write(step, "train", metrics)
        if progress is not None:
          progress.set_postfix_str(_format(metrics))
        else:
          log(f"step {step}: {_format(metrics)}")
        window_start, window_step, window_tokens, data_wait = time.perf_counter(), step, 0, 0.0
        window_real, window_slots = 0, 0

      if step % config.train.eval_every_steps == 0 or last:
        eval_metrics = run_evaluation(step, max_examples=config.eval.bleu_examples)
        log(f"step {step} validation: {_format(eval_metrics)}")
        window_start = time.perf_counter()  # Evaluation time is not training time.

      # Every process calls save at every step; the checkpointer's policy decides what is due.
      checkpointer.save(step, strategy.checkpoint_state(state), train_iter,
                        metrics=eval_metrics, force=preempted or last)
      if preempted:
        break
  if progress is not None:
    progress.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if step < config.train.steps:
    log(f"jaxformer: stopped by {guard.reason} at step {step}; the checkpoint is saved in "
        f"{checkpointer.directory}. Run the same command to resume.")
  return eval_metrics
