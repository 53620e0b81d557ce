"""Fine-tuning: a run that starts from the parameters of another run (`train.init_from`).

`jaxformer train --init-from SOURCE[:STEP|best]` (or the config key `train.init_from`) names a
jaxformer workdir and one of its checkpoints: a saved step, 'best' (the step its
checkpoint.keep_best kept), the name of an averaged checkpoint, or, with no suffix, the newest.
Only its parameters are taken: the optimizer state, the step, the learning-rate schedule and the
data position start afresh. Its vocabulary comes along (the embeddings were trained on its ids):
it is copied into the new workdir and used there. So the data may change (a changed task), and
every setting that keeps the model's shapes (dropout, learning rate, schedule, steps ...); the
model may not (workdir.check_can_start_from).

The training loop calls, in this order:
- `prepare`, before anything is written: resolves the source to a concrete step, recorded in the
  config as 'SOURCE:STEP' (config.json keeps it), checks the model against the source's
  config.json and checkpoint, and reads the parameters onto the strategy's shardings. Each
  failure (no such workdir, no checkpoint, a damaged one, another model) is one CheckpointError.
  A workdir with checkpoints of its own resumes from them: the source is not read again, and
  the source recorded in its config.json stays.
- `copy_vocabulary`, once the workdir is locked, before the vocabulary is loaded;
- `start_state`: the TrainState at step 0, which the loop saves as the run's first checkpoint:
  a resume never needs the source, and, while the step is kept (`checkpoint.keep`), `jaxformer
  evaluate --step 0` measures the source on the new data.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import ml_collections
from jax.experimental import multihost_utils

from jaxformer import checkpoint
from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError
from jaxformer.log import log
from jaxformer.train import parallel
from jaxformer.train import state as state_lib
from jaxformer.train.state import Params, TrainState


@dataclasses.dataclass(frozen=True)
class Source:
  """The checkpoint a fine-tuning run starts from, read."""
  workdir: str          # the source run's workdir (absolute, when local).
  label: int | str      # the step (or the averaged checkpoint's name) read there.
  params: Params        # its parameters, on the strategy's shardings.
  vocabulary: bytes     # its vocab.model.

  @property
  def spec(self) -> str:
    """'SOURCE:STEP', as config.json records it."""
    return f"{self.workdir}:{self.label}"


def split_spec(spec: str) -> tuple[str, str | None]:
  """'runs/a:30' -> ('runs/a', '30'); 'runs/a:best' -> ('runs/a', 'best'); 'runs/a' -> ('runs/a',
  None), the newest step. Only a last ':' part without '/' is a step: 'gs://b/a' is a workdir."""
  workdir, colon, step = spec.rpartition(":")
  if not colon or not workdir or "/" in step:
    return spec, None
  return workdir, step or None


def _with_init_from(config: ml_collections.ConfigDict, value: str
                    ) -> ml_collections.FrozenConfigDict:
  """`config` (frozen) with train.init_from set to `value`."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    unfrozen = config.as_configdict()
  else:
    unfrozen = copy.deepcopy(config)
  unfrozen.train.init_from = value
  return ml_collections.FrozenConfigDict(unfrozen)


def prepare(config: ml_collections.ConfigDict, workdir: str, strategy: parallel.Strategy
            ) -> tuple[ml_collections.FrozenConfigDict, Source | None]:
  """(the config to record and train, the source read) for a run in `workdir`; the source is
  None when the run starts from fresh parameters or resumes from its own checkpoints.

  Writes nothing. Raises CheckpointError (one line, naming `--init-from`) when the source
  cannot be used. Every process calls it and reads the parameters it holds.
  """
  spec = config.train.init_from
  if workdir_lib.has_checkpoints(workdir):
    saved = workdir_lib.read_run_config(workdir)
    recorded = saved.train.init_from if saved is not None else ""
    if spec:
      started = f"it started from {recorded}" if recorded else "it started from fresh parameters"
      log(f"jaxformer: {workdir} has checkpoints, so the run resumes from them ({started}); "
          f"--init-from {spec} is not read")
    return _with_init_from(config, recorded), None
  if not spec:
    return _with_init_from(config, ""), None
  try:
    source = _read(config, spec, strategy)
  except CheckpointError as e:
    raise CheckpointError(f"--init-from {spec}: {e}") from None
  return _with_init_from(config, source.spec), source


def _read(config: ml_collections.ConfigDict, spec: str, strategy: parallel.Strategy) -> Source:
  """Checks the source named by `spec` against `config` and reads it (CheckpointError)."""
  path, step = split_spec(spec)
  source = workdir_lib.absolute_workdir(path)
  workdir_lib.check_run_dir(source)
  source_config = workdir_lib.read_run_config(source)
  if source_config is None:
    raise CheckpointError(f"{workdir_lib.path(source, workdir_lib.CONFIG_FILE)} is missing, so "
                          "which model its checkpoints hold is unknown")
  workdir_lib.check_can_start_from(source_config, config)
  vocab_path = workdir_lib.path(source, workdir_lib.VOCAB_FILE)
  if not vocab_path.exists():
    raise CheckpointError(f"{vocab_path} is missing: the source's parameters need the "
                          "vocabulary they were trained with")
  ckpt_dir, label = checkpoint.checkpoint_dir(source, step)
  abstract = strategy.abstract_state().params
  saved = checkpoint.saved_param_shapes(ckpt_dir, label, source)
  wanted = checkpoint.flat_shapes(abstract)
  if saved != wanted:  # A config.json that does not describe the checkpoint (edited by hand).
    raise CheckpointError(f"the checkpoint {label} in {source} does not fit this model: "
                          f"{checkpoint.describe_mismatch(saved, wanted)}")
  params = checkpoint.restore_params(ckpt_dir, label, source,
                                     sharding=jax.tree.map(lambda s: s.sharding, abstract))
  return Source(workdir=source, label=label, params=params, vocabulary=vocab_path.read_bytes())


def copy_vocabulary(source: Source, workdir: str) -> None:
  """Writes the source's vocab.model into `workdir` (process 0), over one that may be there:
  the parameters need the ids they were trained with. Atomic (a temporary file renamed), and
  every process of a pod waits for it, so that none loads a vocabulary it replaces."""
  if jax.process_index() == 0:
    target = workdir_lib.path(workdir, workdir_lib.VOCAB_FILE)
    tmp = workdir_lib.path(workdir, f"{workdir_lib.VOCAB_FILE}.tmp")
    tmp.write_bytes(source.vocabulary)
    tmp.replace(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxformer_vocabulary_copied")


def start_state(strategy: parallel.Strategy, params: Params) -> TrainState:
  """The TrainState at step 0 of a fine-tuning run: `params` (as `prepare` read them) and the
  optimizer's initial state, placed where the strategy keeps its state (sharded with fsdp,
  replicated per device under pmap)."""
  shardings = jax.tree.map(lambda s: s.sharding, strategy.abstract_state())
  fresh = jax.jit(functools.partial(state_lib.state_from_params, strategy.config),
                  out_shardings=shardings)
  return strategy.place_state(fresh(params))
