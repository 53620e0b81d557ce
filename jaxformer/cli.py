"""`jaxformer train|evaluate|translate|average|info|plot`: the command line.

Each command parses its arguments, then calls one function of the package. A `JaxformerError`
(anything the user can fix) is printed as one line, `error: <message>`, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from jaxformer.errors import JaxformerError


class _Parser(argparse.ArgumentParser):
  """argparse that reports bad arguments as a JaxformerError (one line, exit 2)."""

  def error(self, message):
    raise JaxformerError(f"{self.prog}: {message}")


def _config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default="default",
                      help="experiment name (experiments/NAME.py) or path to an experiment file")


def cmd_info(args, overrides) -> int:
  from jaxformer import config as config_lib
  if args.keys:
    for key, value in config_lib.flatten(config_lib.get_default_config()).items():
      print(f"{key} = {value!r}")
    return 0
  config = config_lib.load_config(args.config, overrides)
  from jaxformer.train import state as state_lib
  counts = state_lib.count_parameters_by_module(config)
  width = max(len(name) for name in counts)
  for name, count in counts.items():
    print(f"{name:<{width}}  {count:>13,}")
  return 0


def cmd_train(args, overrides) -> int:
  from jaxformer import config as config_lib
  from jaxformer.train import loop
  config = config_lib.load_config(args.config, overrides)
  loop.train_and_evaluate(config, args.workdir, restore_step=args.restore_step)
  return 0


COMMANDS = {}


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxformer", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("info", help="parameter count per module, or every config key")
  _config_args(p)
  p.add_argument("--keys", action="store_true", help="list every config key with its default")
  p.set_defaults(run=cmd_info, takes_overrides=True)

  p = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
  _config_args(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--restore-step", type=int, default=None,
                 help="resume from this checkpoint step instead of the newest")
  p.set_defaults(run=cmd_train, takes_overrides=True)
  return parser


def main(argv: list[str] | None = None) -> int:
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
    return args.run(args, overrides)
  except JaxformerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  raise SystemExit(main())
