"""`jaxformer train|evaluate|translate|export|import|average|info|plot|prepare`: the command line.

Each command parses its arguments, then calls one function of the package. A `JaxformerError`
(anything the user can fix) is printed as one line, `error: <message>`, with exit status 2.
Results go to stdout; messages to stderr through jaxformer.log. Each command imports what it
needs when it runs, so that `--help` and a wrong argument answer without loading jax.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxformer.errors import (EXIT_FINISHED, EXIT_STOPPED, EXIT_USER_ERROR, InputError,
                              JaxformerError, StorageError)


# The table of exit statuses, at the end of `--help`.
EXIT_STATUSES = f"""exit statuses:
  {EXIT_FINISHED}    finished (training reached train.steps, or early stopping ended it)
  {EXIT_USER_ERROR}    a user error, one `error:` line, nothing written (also a diverged run: its
       last good checkpoint is kept)
  {EXIT_STOPPED}   stopped by SIGTERM, SIGINT or SIGHUP, with a checkpoint at the stop step; run
       the same command to resume
  130  a second Ctrl-C ended the run at once, without a checkpoint
  else a crash"""


class _Parser(argparse.ArgumentParser):
  """argparse that reports bad arguments as a JaxformerError (one line, exit 2)."""

  def error(self, message):
    raise JaxformerError(f"{self.prog}: {message}")


# The epilog of every command that takes overrides: argparse's usage line cannot show them.
# Wrapped by hand for `train`, whose epilog (with EXIT_STATUSES) is printed as it is.
OVERRIDES_HELP = """Any config key can be set on the command line: --config.KEY=VALUE (or
--config.KEY VALUE), e.g. --config.train.steps=100; `jaxformer info --keys
--config EXPERIMENT` lists every key with its value."""


def _config_args(parser: argparse.ArgumentParser, default: str | None = "default") -> None:
  parser.add_argument("--config", default=default,
                      help="experiment name (experiments/NAME.py) or path to an experiment file")


def version() -> str:
  """The installed distribution's version; the source tree's pyproject.toml when jaxformer runs
  from a checkout that was never installed."""
  import importlib.metadata
  try:
    return importlib.metadata.version("jaxformer")
  except importlib.metadata.PackageNotFoundError:
    import tomllib
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "pyproject.toml")
    try:
      with open(pyproject, "rb") as f:
        return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
      return "unknown"


def _at_least(minimum: int):
  """An argparse type: a whole number >= `minimum` (`--beam-size 0` is refused, not ignored)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value
  parse.__name__ = f"integer >= {minimum}"
  return parse


def _finite(text: str) -> float:
  """An argparse type: a finite number."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text} must be a finite number")
  return value


def check_output_file(path: str, flag: str) -> None:
  """Refuses, before any work starts, an output file that cannot be written."""
  if os.path.isdir(path):
    raise InputError(f"{flag} {path} is a directory; give a file name")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise InputError(f"{flag} {path}: the directory {directory} does not exist; create it first")
  writable = os.access(path if os.path.exists(path) else directory, os.W_OK)
  if not writable or os.statvfs(directory).f_flag & os.ST_RDONLY:
    raise InputError(f"{flag} {path} cannot be written (no permission, or a read-only file "
                     "system); choose another place")


def _print_keys(config) -> None:
  """Every key of `config` with its value; a value that is not the schema's default says so."""
  from jaxformer import config as config_lib
  defaults = config_lib.flatten(config_lib.get_default_config())
  for key, value in config_lib.flatten(config).items():
    note = "" if value == defaults[key] else f"  (default {defaults[key]!r})"
    print(f"{key} = {value!r}{note}")


def cmd_info(args, overrides) -> int:
  from jaxformer import config as config_lib
  if args.keys and args.config is None:  # The schema itself, with any overrides.
    config = config_lib.get_default_config()
    config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    _print_keys(config)
    return 0
  config = config_lib.load_config(args.config or "default", overrides)
  if args.keys:
    _print_keys(config)
    return 0
  from jaxformer.train import state as state_lib
  counts = state_lib.count_parameters_by_module(config, depth=args.depth)
  width = max(len(name) for name in counts)
  for name, count in counts.items():
    print(f"{name:<{width}}  {count:>13,}")
  return 0


def cmd_train(args, overrides) -> int:
  from jaxformer import config as config_lib
  if args.init_from is not None:  # The flag is a short way to write the config key.
    if overrides.get(INIT_FROM_KEY, args.init_from) != args.init_from:
      raise JaxformerError(f"--init-from {args.init_from} and --config.{INIT_FROM_KEY}="
                           f"{overrides[INIT_FROM_KEY]} differ; give the source once")
    overrides = {**overrides, INIT_FROM_KEY: args.init_from}
  config = config_lib.load_config(args.config, overrides)
  from jaxformer.train import loop
  # The loop joins the processes and checks the config against the devices, the workdir and
  # the data before it writes to the workdir.
  try:
    result = loop.train_and_evaluate(config, args.workdir, restore_step=args.restore_step)
  except Exception as e:
    _raise_if_storage_failure(e, args.workdir)
    raise
  return EXIT_FINISHED if result.finished else EXIT_STOPPED


def _raise_if_storage_failure(error: Exception, workdir: str) -> None:
  """A full disk (or a read-only one) during training: one line with the path, the free space
  and the last good checkpoint, from which the same command resumes."""
  from jaxformer import checkpoint, workdir as workdir_lib
  problem = workdir_lib.storage_problem(error, where=workdir)
  if problem is None:
    return
  steps = checkpoint.saved_steps(workdir)
  last = (f"the last good checkpoint is step {steps[-1]} in "
          f"{workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR)}" if steps
          else "no checkpoint was saved yet")
  raise StorageError(f"{problem}; {last}; make room (or fix the permissions), then run the "
                     "same command to resume") from None


def cmd_evaluate(args, overrides) -> int:
  import json
  if args.hypotheses:
    check_output_file(args.hypotheses, "--hypotheses")
  from jaxformer import devices, inference
  from jaxformer import workdir as workdir_lib
  from jaxformer.train.writer import MetricsWriter
  devices.initialize_distributed()  # On a pod, every process evaluates its share of the split.
  _, params, config, tokenizer, step = inference.load_for_inference(args.workdir, args.step)
  metrics = inference.evaluate_checkpoint(
      config, params, tokenizer=tokenizer,
      data_dir=workdir_lib.resolve_data_dir(config, args.workdir), split=args.split,
      beam_size=args.beam_size, alpha=args.alpha, num_samples=args.samples,
      max_examples=args.max_examples, keep_hypotheses=bool(args.hypotheses))
  samples = metrics.pop("samples", [])
  hypotheses = metrics.pop("hypotheses", [])
  metrics["checkpoint"] = step
  metrics["beam_size"] = args.beam_size or config.decode.beam_size
  metrics["alpha"] = config.decode.alpha if args.alpha is None else args.alpha
  from jaxformer.log import log
  if args.hypotheses:
    _write_hypotheses(args.hypotheses, hypotheses)
  try:
    writer = MetricsWriter(args.workdir)
    writer.write(step if isinstance(step, int) else -1, args.split, metrics)
    writer.close()
  except OSError as e:  # A read-only workdir: the result still goes to stdout.
    log(f"jaxformer: could not update {workdir_lib.path(args.workdir, workdir_lib.METRICS_FILE)} "
        f"({e.strerror or e}); the result is printed below only")
  for sample in samples:
    log(f"  source:      {sample['source']}\n  reference:   {sample['reference']}\n"
        f"  translation: {sample['translation']}\n")
  log(f"sacrebleu signature: {metrics['bleu_signature']}")
  log(f"sacrebleu chrF signature: {metrics['chrf_signature']}")
  if devices.is_first_process():  # One result for the whole split, however many processes.
    print(json.dumps(metrics))
  return 0


def _write_hypotheses(path: str, hypotheses: list[str]) -> None:
  """Writes one hypothesis a line, UTF-8 with "\n" ends, from process 0 only (every process of
  a pod evaluates, and has every hypothesis)."""
  from jaxformer import devices
  from jaxformer.data import text as text_lib
  if not devices.is_first_process():
    return
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    # One line each, whatever the model wrote: line i is the hypothesis of example i.
    f.write("".join(text_lib.one_line(h) + "\n" for h in hypotheses))


def _write_stdout(text: str) -> None:
  """`text` to stdout, flushed: its UTF-8 bytes with "\\n" ends, as the input's."""
  if getattr(sys.stdout, "buffer", None) is None:  # A text-only stdout (a test's StringIO).
    sys.stdout.write(text)
    sys.stdout.flush()
    return
  # The bytes, not sys.stdout's text layer: its newline translation and encoding depend on the
  # platform and locale (PYTHONIOENCODING).
  sys.stdout.flush()
  sys.stdout.buffer.write(text.encode("utf-8"))
  sys.stdout.buffer.flush()


class _Output:
  """Where translate writes: --output FILE or stdout, flushed at every write so that each chunk
  can be read as soon as it is done. The file is created at the first write: an input file
  found bad before any translation leaves none."""

  def __init__(self, path: str | None):
    self.path, self.file = path, None

  def write(self, text: str) -> None:
    if self.path is None:
      _write_stdout(text)
      return
    if self.file is None:
      self.file = open(self.path, "w", encoding="utf-8", newline="\n")
    self.file.write(text)
    self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


class _Prompting:
  """A binary stdin that prints a prompt on stderr before each line it reads (--interactive at
  a terminal)."""

  def __init__(self, stream, prompt: str = "> "):
    self.stream, self.prompt = stream, prompt

  def readline(self) -> bytes:
    from jaxformer.log import to_stderr
    to_stderr(lambda: print(self.prompt, end="", file=sys.stderr, flush=True))
    return self.stream.readline()


def _translate_source(args):
  """The lines translate reads: --input FILE (checked whole before any is translated) or
  stdin, one line at a time (iter_lines reads a line with one readline, never a chunk ahead)."""
  from jaxformer import inference
  from jaxformer.data import text as text_lib
  if args.input:
    return inference.LineSource(lambda: text_lib.file_lines(args.input, InputError), args.input,
                                check_first=True)
  stdin = sys.stdin.buffer
  if args.interactive and sys.stdin.isatty():
    stdin = _Prompting(stdin)
  return inference.LineSource(lambda: text_lib.iter_lines(stdin, "stdin", InputError), "stdin")


def cmd_translate(args, overrides) -> int:
  if args.output:
    check_output_file(args.output, "--output")
  if args.interactive and args.input:
    raise InputError("--interactive answers the lines of stdin; drop --input FILE")
  from jaxformer import devices
  devices.initialize_distributed()  # A pod runs translate as one program on every process.
  import jax
  if jax.process_count() > 1 and not args.output:
    raise InputError(f"on a pod ({jax.process_count()} processes) translate writes to --output "
                     "FILE only (the launcher prefixes each line a process prints); add one")
  from jaxformer import inference
  from jaxformer.log import log
  run = inference.load_for_inference(args.workdir, args.step)
  decoder = inference.parallel_decoder(run, args.beam_size, args.alpha, args.max_extra_len)
  output = _Output(args.output)
  try:
    report = inference.translate(
        decoder, run.tokenizer, _translate_source(args), output.write,
        batch_size=1 if args.interactive else args.batch_size, nbest=args.nbest,
        scores=args.scores, truncate=args.truncate)
    if devices.is_first_process():
      output.write("")  # An empty input still gets its (empty) output file.
  finally:
    output.close()
  if report.truncated:
    log(f"jaxformer: {report.truncated} of {report.lines} line(s) had more than max_len="
        f"{decoder.max_len} tokens and were truncated (--truncate)")
  return 0


def cmd_prepare(args, overrides) -> int:
  from jaxformer import config as config_lib
  from jaxformer import workdir as workdir_lib
  from jaxformer.data import sources
  config = config_lib.load_config(args.config, overrides)
  data_dir = workdir_lib.resolve_data_dir(config, args.workdir)
  workdir_lib.check_can_write(data_dir, name="the data directory")
  builder = sources.prepare(config, data_dir)
  for split, info in builder.info.splits.items():
    print(f"{split}: {info.num_examples} examples")
  print(f"prepared in {builder.data_dir}")
  return 0


def cmd_average(args, overrides) -> int:
  from jaxformer import inference
  path = inference.average_checkpoints(args.workdir, args.last, up_to=args.step)
  print(path)
  return 0


def cmd_export(args, overrides) -> int:
  from jaxformer import inference
  print(inference.export_run(args.workdir, args.step, args.format, args.out, args.quantize))
  return 0


def cmd_import(args, overrides) -> int:
  from jaxformer import inference
  print(inference.import_run(args.format, args.source, args.workdir))
  return 0


def cmd_plot(args, overrides) -> int:
  check_output_file(args.out, "--out")
  from jaxformer import plots
  plots.check_format(args.out)
  from jaxformer import inference
  if args.plot == "attention":
    maps = inference.plot_attention(args.workdir, args.text, step=args.step, out=args.out,
                                    layer=args.layer)
    from jaxformer.log import log
    log(f"translation: {maps.translation}")
  elif args.plot == "positions":
    config = None
    if args.config is not None or args.workdir is None:
      from jaxformer import config as config_lib
      config = config_lib.load_config(args.config or "default", overrides)
    elif overrides:
      raise JaxformerError("--config.KEY overrides need --config EXPERIMENT; with --workdir "
                           "alone the run's own config is used")
    inference.plot_positions(config, args.workdir, out=args.out, step=args.step)
  else:
    inference.plot_curves(args.workdir, out=args.out)
  print(args.out)
  return 0


def _step_arg(text: str):
  """--step takes a number, 'best' (the step checkpoint.keep_best kept) or the name of an
  averaged checkpoint."""
  return int(text) if text.isdigit() else text


# The config key that --init-from sets.
INIT_FROM_KEY = "train.init_from"

# The help of --step, wherever a command reads a checkpoint.
STEP_HELP = ("checkpoint: a saved step, 'best' (the best step by the validation metric "
             "checkpoint.keep_best names, among the kept ones) or an averaged checkpoint's name "
             "(default: the newest)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxformer", description=__doc__.splitlines()[0], epilog=EXIT_STATUSES,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"jaxformer {version()}")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  for add_command in (_add_info, _add_train, _add_evaluate, _add_translate, _add_prepare,
                      _add_average, _add_export, _add_import, _add_plot):
    add_command(sub)
  return parser


def _add_info(sub) -> None:
  p = sub.add_parser("info", help="parameter count per module, or every config key",
                     epilog=OVERRIDES_HELP)
  _config_args(p, default=None)  # None: --keys lists the schema's defaults; counts: 'default'.
  p.add_argument("--keys", action="store_true",
                 help="list every config key with its value: the defaults, or with --config "
                 "the experiment's (overrides applied)")
  p.add_argument("--depth", type=_at_least(1), default=2,
                 help="module levels to break the count down into (default 2: layers)")
  p.set_defaults(run=cmd_info, takes_overrides=True)


def _add_train(sub) -> None:
  p = sub.add_parser("train", help="train (or resume) an experiment in a workdir",
                     epilog=f"{OVERRIDES_HELP}\n\n{EXIT_STATUSES}",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  _config_args(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--restore-step", type=_at_least(0), default=None,
                 help="resume from this checkpoint step instead of the newest")
  p.add_argument("--init-from", default=None, metavar="SOURCE[:STEP|best]",
                 help="fine-tune: a new run starts from the parameters (and vocabulary) of "
                 "the workdir SOURCE, at a saved step, 'best' or (default) the newest; "
                 "optimizer, step, schedule and data start fresh (the config key "
                 f"{INIT_FROM_KEY}; a workdir with checkpoints resumes from them instead)")
  p.set_defaults(run=cmd_train, takes_overrides=True)


def _add_evaluate(sub) -> None:
  p = sub.add_parser("evaluate", help="loss, accuracy, exact match, BLEU and chrF on a split")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=_step_arg, default=None, metavar="STEP|best",
                 help=STEP_HELP)
  p.add_argument("--split", default="test", choices=("train", "validation", "test"))
  p.add_argument("--beam-size", type=_at_least(1), default=None)
  p.add_argument("--alpha", type=_finite, default=None)
  p.add_argument("--samples", type=_at_least(0), default=0,
                 help="print this many sample translations")
  p.add_argument("--max-examples", type=_at_least(1), default=None, metavar="N",
                 help="evaluate only the first N examples of the split (default: all)")
  p.add_argument("--hypotheses", default=None, metavar="FILE",
                 help="write the translations there, one a line, in the split's order")
  p.set_defaults(run=cmd_evaluate)


# The epilog of `translate --help`: what it writes.
TRANSLATE_HELP = """Lines end at "\\n" only; an empty (or blank) line gives an empty translation.
Input is read --batch-size lines at a time, and each chunk's translations are
written (and flushed) as soon as it is done, in input order.

Output: one translation per input line. With --nbest N and/or --scores, one row
per hypothesis instead, tab-separated, the text last:
  index<TAB>rank<TAB>score<TAB>text
index: the input line's number from 0; rank: 1 (the best) to N (1 without
--nbest); score: the length-normalised log-probability (9 significant digits;
an empty line's N rows score 0); the score column only with --scores.

A line longer than the model's max_len tokens is an error (exit 2) unless
--truncate. An --input FILE is checked whole before anything is written; on
stdin the error comes when the line is read (what was written stays). On a pod
every process runs the same command, and --output FILE is required."""


def _add_translate(sub) -> None:
  p = sub.add_parser("translate", help="translate lines of text with beam search (a file or a "
                     "stream)", epilog=TRANSLATE_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=_step_arg, default=None, metavar="STEP|best",
                 help=STEP_HELP)
  p.add_argument("--beam-size", type=_at_least(1), default=None,
                 help="1 for greedy search (default: the run's decode.beam_size)")
  p.add_argument("--alpha", type=_finite, default=None,
                 help="length penalty ((5 + len) / 6) ** alpha (default: the run's decode.alpha)")
  p.add_argument("--max-extra-len", type=_at_least(0), default=None,
                 help="output length <= input length + this, capped by the model's max_len "
                 "(default: the run's decode.max_extra_len)")
  p.add_argument("--batch-size", type=_at_least(1), default=32,
                 help="lines read, decoded and written at a time (default 32)")
  p.add_argument("--input", default=None, help="file of source lines (default: stdin)")
  p.add_argument("--output", default=None, help="file for the translations (default: stdout)")
  p.add_argument("--interactive", action="store_true",
                 help="answer each line of stdin as soon as it is read (a prompt on stderr at "
                 "a terminal), until end of input")
  p.add_argument("--nbest", type=_at_least(1), default=None,
                 help="the N best hypotheses of each line (N <= beam size), in rows")
  p.add_argument("--scores", action="store_true", help="add each hypothesis's score, in rows")
  p.add_argument("--truncate", action="store_true",
                 help="cut lines longer than the model's max_len (and count them) instead of "
                 "stopping")
  p.set_defaults(run=cmd_translate)


def _add_prepare(sub) -> None:
  p = sub.add_parser("prepare", help="download (catalog) or build (generated, text) the "
                     "dataset of an experiment", epilog=OVERRIDES_HELP)
  _config_args(p)
  p.add_argument("--workdir", required=True, help="data goes to data.data_dir or WORKDIR/tfds")
  p.set_defaults(run=cmd_prepare, takes_overrides=True)


def _add_average(sub) -> None:
  p = sub.add_parser("average", help="average the parameters of the last K checkpoints")
  p.add_argument("--workdir", required=True)
  p.add_argument("--last", type=_at_least(1), required=True, metavar="K")
  p.add_argument("--step", type=_step_arg, default=None, metavar="S|best",
                 help="average the last K saved steps up to and including this one: a saved "
                 "step, or 'best' (the step checkpoint.keep_best kept) (default: the newest)")
  p.set_defaults(run=cmd_average)


def _add_export(sub) -> None:
  from jaxformer import interop
  p = sub.add_parser("export", help="write a checkpoint for Hugging Face (MarianMT), "
                     "CTranslate2 or StableHLO (jax.export)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=_step_arg, default=None, metavar="STEP|best", help=STEP_HELP)
  p.add_argument("--format", required=True, choices=tuple(interop.EXPORT_MODULES))
  p.add_argument("--out", required=True, metavar="DIR",
                 help="a new (or empty) directory; written whole or not at all")
  p.add_argument("--quantize", default=None,
                 choices=sorted({q for qs in interop.QUANTIZATIONS.values() for q in qs}),
                 help="ctranslate2 only: store the weights as int8")
  p.set_defaults(run=cmd_export)


def _add_import(sub) -> None:
  from jaxformer import interop
  p = sub.add_parser("import", help="make a Hugging Face MarianMT model directory (e.g. an "
                     "Opus-MT model) a jaxformer workdir")
  p.add_argument("--format", required=True, choices=tuple(interop.IMPORT_MODULES))
  p.add_argument("--from", dest="source", required=True, metavar="DIR",
                 help="the model directory (what save_pretrained wrote)")
  p.add_argument("--workdir", required=True,
                 help="a new (or empty) directory: config.json, vocabulary, one checkpoint")
  p.set_defaults(run=cmd_import)


def _add_plot(sub) -> None:
  p = sub.add_parser("plot", help="draw attention maps, positional encodings or training curves")
  kinds = p.add_subparsers(dest="plot", required=True, parser_class=_Parser,
                           metavar="{attention,positions,curves}")
  k = kinds.add_parser("attention", help="translate a sentence and draw its attention weights")
  k.add_argument("--workdir", required=True)
  k.add_argument("--text", required=True, help="the source sentence to translate")
  k.add_argument("--step", type=_step_arg, default=None, metavar="STEP|best",
                 help=STEP_HELP)
  k.add_argument("--layer", type=int, default=-1,
                 help="cross-attention layer whose heads are drawn (default: -1, the last)")
  k.add_argument("--out", default="attention.png", help="image file (.png, .pdf, .svg ...)")
  k.set_defaults(run=cmd_plot)
  k = kinds.add_parser("positions", help="the positional encoding table and its similarities",
                       epilog=OVERRIDES_HELP)
  k.add_argument("--config", default=None,
                 help="experiment name or file (default: the run's config with --workdir, "
                 "else 'default')")
  k.add_argument("--workdir", default=None,
                 help="a trained run: its learned table (model.pos_encoding='learned')")
  k.add_argument("--step", type=_step_arg, default=None, metavar="STEP|best",
                 help=f"with --workdir, the {STEP_HELP}")
  k.add_argument("--out", default="positions.png")
  k.set_defaults(run=cmd_plot, takes_overrides=True)
  k = kinds.add_parser("curves", help="loss, learning rate, tokens/s and BLEU against step")
  k.add_argument("--workdir", action="append", required=True,
                 help="a run's workdir; repeat to compare runs on one figure")
  k.add_argument("--out", default="curves.png")
  k.set_defaults(run=cmd_plot)


def _run(args, overrides) -> int:
  """Runs the command; a full disk or an unwritable file is a JaxformerError naming the path."""
  from jaxformer import log
  log.one_line_library_errors()  # jaxformer reports what failed itself, in one line.
  try:
    return args.run(args, overrides)
  except JaxformerError:
    raise
  except Exception as e:
    from jaxformer import workdir as workdir_lib
    problem = workdir_lib.storage_problem(e)
    if problem is None:
      raise  # A bug: keep its traceback.
    raise StorageError(problem) from None


def main(argv: list[str] | None = None) -> int:
  as_program = argv is None  # The console script or `python -m jaxformer`, not a caller.
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  try:
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    if rest:
      if not getattr(args, "takes_overrides", False):
        raise JaxformerError(f"unexpected arguments: {' '.join(rest)}")
      from jaxformer.config import parse_override_args
      overrides = parse_override_args(rest)
    from jaxformer.train import jax_internals
    jax_internals.install()  # jaxformer's process-wide hooks, before the first compilation.
    return _run(args, overrides)
  except StorageError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    if as_program:
      # Nothing more can be written: leave now, so that no library retries its buffered writes
      # at exit (TensorBoard's event writer does) and prints their tracebacks after this line.
      sys.stdout.flush()
      os._exit(EXIT_USER_ERROR)
    return EXIT_USER_ERROR
  except JaxformerError as e:
    # A print, not jaxformer.log: every process of a pod reports its own error (log() speaks
    # from process 0 only), and an argument error comes before jax is loaded.
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except BrokenPipeError:  # `jaxformer ... | head`: the reader left; nothing to report.
    sys.stderr.close()
    return 0
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  raise SystemExit(main())
