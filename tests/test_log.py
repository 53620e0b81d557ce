"""jaxformer/log.py: one line on stderr, from process 0 only unless every process must speak."""

import jax

from jaxformer import log as log_lib


def as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_a_single_process_speaks_without_a_prefix(capsys):
  log_lib.log("hello")
  log_lib.log("for all", all_processes=True)
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err == "hello\nfor all\n"


def test_on_a_pod_only_process_0_speaks_unless_all_must(monkeypatch, capsys):
  as_process(monkeypatch, 1, 4)
  log_lib.log("once")
  log_lib.log("everyone", all_processes=True)
  assert capsys.readouterr().err == "[process 1] everyone\n"
  as_process(monkeypatch, 0, 4)
  log_lib.log("once")
  assert capsys.readouterr().err == "once\n"


def test_what_libraries_log_about_a_failure_jaxformer_reports_is_quiet(caplog):
  from jaxformer import log as log_lib
  import logging
  log_lib.one_line_library_errors()
  try:
    raise ValueError("OUT_OF_RANGE: a truncated file\nmore")
  except ValueError as e:
    error = e
  with caplog.at_level(logging.WARNING):
    logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task>",
                                       exc_info=error)
    logging.getLogger("absl").error("save failed: %s", "disk full\nline two", exc_info=error)
  assert [(r.name, r.getMessage(), r.exc_info) for r in caplog.records] == [
      ("absl", "save failed: disk full", None)]
