"""Preemption: SIGTERM (a preempted VM, `kill`), SIGINT (Ctrl-C) and SIGHUP (the ssh session or
terminal of the run went away) become an agreed stop step.

A long run is stopped from outside: a cloud VM is preempted (SIGTERM, with some seconds of
grace), a scheduler ends a job, a user presses Ctrl-C. None of these may lose the work since the
last checkpoint. `PreemptionGuard` catches the signal, and the training loop asks it at every
step whether to stop; on one host that is the step during which the signal came, on a pod it is a
step every host agrees on (jax.distributed's preemption sync service), so that all hosts save
the same step and none waits forever in a collective the others left. Within a step, the
loop's evaluation asks the guard's local flag (`requested`) before every batch.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Iterable

from jax.experimental import multihost_utils

from jaxformer.train import jax_internals


class PreemptionGuard:
  """Turns SIGTERM (preemption, `kill`), SIGINT (Ctrl-C) and SIGHUP (a dropped ssh session)
  into a request to stop cleanly.

  While the guard is entered, these signals no longer kill the process: they set a flag, and
  `should_stop(step)` becomes True. The loop then saves a checkpoint at that step, waits for
  it, and the command exits with status 75 (stopped; the same command resumes). A second
  signal, of any kind, acts as if no guard were installed (Ctrl-C twice, or SIGTERM then
  Ctrl-C: KeyboardInterrupt; a second SIGTERM: the default action, which ends the process at
  once), without a checkpoint: the way out when the clean stop takes too long. Two signals that
  come while Python waits for the devices reach Python (the guard or Python's own handlers)
  only after that wait, one per kind: two Ctrl-C in one batch of beam search are one. On exit
  the previous handlers are restored. Enter it in the main thread (Python delivers signals
  there only).

  Multi-host: when jax.distributed runs its preemption service (the default after
  `jax.distributed.initialize()`), SIGTERM is left to jax's notifier, SIGINT and SIGHUP are
  forwarded to it, and `should_stop(step)` is
  `multihost_utils.reached_preemption_sync_point(step)`: True on every host at the same step,
  a few steps after any host got the signal. Otherwise (one process) it is the local flag, True
  from the step during which the signal came.

  The training loop, on every process:

      with preemption.PreemptionGuard() as guard:
        for step in range(start_step, config.train.steps):
          state, metrics = train_step(state, next(batches))  # state.step == step + 1
          checkpointer.save(step + 1, state, batches)        # due every every_steps
          if guard.should_stop(step + 1):                   # call it at every step
            checkpointer.save(step + 1, state, batches, force=True)
            checkpointer.wait()
            print(f"stopped by {guard.reason} at step {step + 1}; checkpoint in "
                  f"{checkpointer.directory}; run the same command to resume")
            return                                          # exit status 75
        checkpointer.save(config.train.steps, state, batches, force=True)
      checkpointer.close()
  """

  def __init__(self,
               signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._received: int | None = None
    self._sync_hosts = False

  def __enter__(self) -> "PreemptionGuard":
    self._sync_hosts = jax_internals.preemption_service_running()
    for signum in self._signals:
      if self._sync_hosts and signum == signal.SIGTERM:
        continue  # jax's preemption notifier handles SIGTERM and tells the other hosts.
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum in list(self._previous):
      self._put_back(signum)

  def _put_back(self, signum: int) -> None:
    handler = self._previous.pop(signum)
    # None: a handler installed outside Python, which cannot be put back; use the default.
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)

  def _on_signal(self, signum: int, frame: Any) -> None:
    del frame
    if self._received is not None:  # A second one, of any kind: behave as without the guard.
      self.__exit__()
      signal.raise_signal(signum)
      return
    self._received = signum
    # The next signal of this kind goes straight to the handler from before the guard: for
    # SIGTERM the default action, which ends the process even while it waits for the devices
    # (a Python handler, this one included, runs only once that wait is over). The other kind
    # still comes here: it may be waiting already (Python runs the handlers of signals that
    # came during one wait in the order of their numbers, SIGINT first), and given a default
    # handler now it would be dropped.
    self._put_back(signum)
    if self._sync_hosts:
      os.kill(os.getpid(), signal.SIGTERM)  # Hand it to jax's notifier (all hosts agree).

  @property
  def requested(self) -> bool:
    """Whether this process received one of the signals (SIGTERM under jax.distributed aside:
    jax's notifier takes it, and only `should_stop(step)` learns of it, at a step)."""
    return self._received is not None

  @property
  def reason(self) -> str:
    """'SIGTERM', 'SIGINT' ..., or 'a preemption notice' when jax's service relayed it."""
    if self._received is not None:
      return signal.Signals(self._received).name
    return "a preemption notice"

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and stop. Call at every step, on every process."""
    if self._sync_hosts:
      try:
        return multihost_utils.reached_preemption_sync_point(int(step))
      except RuntimeError:  # The service was disabled after all: fall back to the flag.
        self._sync_hosts = False
    return self._received is not None
