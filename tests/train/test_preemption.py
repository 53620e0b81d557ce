"""PreemptionGuard: a signal becomes a stop step, alone and through jax's preemption service."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from jaxformer.train import preemption


def test_preemption_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
  received = []

  def previous_handler(signum, frame):
    received.append(signum)

  old = signal.signal(signal.SIGTERM, previous_handler)
  try:
    with preemption.PreemptionGuard() as guard:
      assert not guard.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)  # Delivered at the next bytecode boundary.
      assert guard.requested and guard.should_stop(2)
      assert guard.reason == "SIGTERM"
      assert received == []  # The guard took it; the process goes on.
    assert signal.getsignal(signal.SIGTERM) is previous_handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, old)


def test_preemption_guard_second_sigint_interrupts_at_once():
  # Python's own Ctrl-C handler, as in a user's process. (A process started in the background
  # by a shell without job control inherits SIGINT ignored, and so may this test's.)
  old = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      with preemption.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop(1) and guard.reason == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # The second Ctrl-C: the usual KeyboardInterrupt.
        for _ in range(1000):  # Give Python a bytecode boundary to run the handler.
          pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, old)


def spin():
  for _ in range(1000):  # Give Python a bytecode boundary to run the handler.
    pass


def test_preemption_guard_sigint_after_sigterm_interrupts_at_once():
  old = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      with preemption.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)  # The clean stop asked for ...
        spin()
        assert guard.should_stop(1) and guard.reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # ... and Ctrl-C because it takes too long.
        spin()
        pytest.fail("the second signal did not interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_preemption_guard_sigterm_after_any_signal_is_handled_as_without_the_guard(first):
  """The handler from before the guard gets the second signal (the default one would end the
  process: here a recording one stands in for it)."""
  received = []

  def previous_handler(signum, frame):
    received.append(signum)

  old_term = signal.signal(signal.SIGTERM, previous_handler)
  old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.PreemptionGuard() as guard:
      os.kill(os.getpid(), first)
      spin()
      assert guard.requested and received == []
      if first == signal.SIGTERM:
        # Back with its own handler at once, so that the kernel's default action can end the
        # process even in the middle of a device computation.
        assert signal.getsignal(signal.SIGTERM) is previous_handler
      os.kill(os.getpid(), signal.SIGTERM)
      spin()
      assert received == [signal.SIGTERM] and guard.reason == signal.Signals(first).name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGTERM, old_term)
    signal.signal(signal.SIGINT, old_int)


@pytest.mark.slow
def test_preemption_guard_agrees_through_the_jax_preemption_service(tmp_path):
  """Under jax.distributed, SIGTERM goes to jax's notifier; all hosts stop at one sync step."""
  script = textwrap.dedent("""
      import os, signal, socket, sys, time
      os.environ["JAX_PLATFORMS"] = "cpu"
      import jax
      with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
      jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
      from jaxformer.train import preemption
      with preemption.PreemptionGuard() as guard:
        for step in range(1, 2000):  # The sync point comes about a second after the signal.
          if step == 3:
            os.kill(os.getpid(), signal.SIGINT if sys.argv[1] == "int" else signal.SIGTERM)
          time.sleep(0.01)
          if guard.should_stop(step):
            print(f"stopped at {step} by {guard.reason}", flush=True)
            break
        else:
          print("never stopped", flush=True)
      jax.distributed.shutdown()
  """)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root)
  for kind, reason in (("term", "a preemption notice"), ("int", "SIGINT")):
    result = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("stopped at")]
    assert line and line[0].endswith(f"by {reason}"), result.stdout + result.stderr[-2000:]
    assert int(line[0].split()[2]) > 3
