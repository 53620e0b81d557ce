"""Test-wide setup: eight simulated CPU devices, so multi-device code is tested without any.

This must run before jax is imported anywhere, which conftest.py guarantees. Like every entry
point, the suite then installs jaxformer's process-wide hooks (jax_internals.install), so the
tests run the code as `jaxformer` runs it.
"""

import os
import signal

# The compiler's backend (LLVM) optimizations off, as for the runs of tests/run_testing.py: the
# suite's tiny models spend most of their time compiling (a fifth less CPU time with these),
# and the tests compare programs compiled alike, never speed.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jaxformer.train import jax_internals  # noqa: E402  (after the environment above)

jax_internals.install()

# The suite runs commands as a user at a terminal does, Ctrl-C included. A shell that starts
# the suite in the background ignores SIGINT for it, and children inherit an ignored signal:
# a Python handler here instead becomes the default in each child, so Ctrl-C (SIGINT) is a
# KeyboardInterrupt there, as at a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The files that take longest (minutes of subprocess runs each), in that order. launch.sh's
# pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands files to its workers in
# collection order, so these go first: the suite ends with short files on both workers, not
# with one long file (the bf16 test is one test of 80 s) on one of them.
LONGEST_FILES = ("test_resume.py", "test_multihost.py", "test_cli.py", "test_launcher.py",
                 "test_bf16_quality.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
  items.sort(key=rank)  # Stable: within a file, and among the others, the order stays.


# The optional `interop` extra (pyproject.toml): its tests skip without it, and the run says so
# in one line. CI installs it (.ci/run), so there they always run.
INTEROP_LIBRARIES = ("transformers", "torch", "safetensors", "ctranslate2")


def interop_skip_line() -> str | None:
  """One line naming the interop libraries that are missing, or None when all are installed."""
  import importlib.util
  missing = [name for name in INTEROP_LIBRARIES if importlib.util.find_spec(name) is None]
  if not missing:
    return None
  return (f"interop tests skipped: {', '.join(missing)} not installed (install the extra: "
          "JAXFORMER_EXTRAS=interop ./launch.sh test)")


def pytest_report_header(config):
  return interop_skip_line()


def pytest_terminal_summary(terminalreporter):
  line = interop_skip_line()
  if line:
    terminalreporter.write_line(line)
