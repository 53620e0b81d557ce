"""Every bad input a user can give is one line, `error: ...`, exit status 2, no traceback, and
nothing written: a table of cases, run through `jaxformer.cli.main` in this process (each case
stops before any work, so no model is compiled and no subprocess is needed).

Cases that need a trained run (a hand-edited config.json, an unwritable output file) use a copy
of the session's reference run; the full and read-only disks are in tests/test_storage.py.
"""

import os
import shutil

import pytest

from jaxformer import cli

from tests import run_testing

EXPERIMENT_FILES = {
    "syntax.py": "def get_config(:\n",
    "not_a_config.py": "def get_config():\n  return 5\n",
    "wrong_type.py": ("from jaxformer.config import get_default_config\n"
                      "def get_config():\n  c = get_default_config()\n  c.train.steps = 'many'\n"
                      "  return c\n"),
    "unknown_key.py": ("from jaxformer.config import get_default_config\n"
                       "def get_config():\n  c = get_default_config()\n  c.train.stepz = 5\n"
                       "  return c\n"),
    "import_error.py": "import a_module_that_does_not_exist\n",
    "raises.py": "def get_config():\n  raise ValueError('boom')\n",
    "no_get_config.py": "CONFIG = 1\n",
}

# (overrides of the tiny default experiment, fragments of the one error line). {x} is the
# directory of the files above and of the text files below.
TRAIN_CASES = [
    (["decode.max_extra_len=-5"], ["decode.max_extra_len=-5 must be >= 0"]),
    (["data.num_validation=0"], ["data.num_validation=0 must be positive"]),
    (["data.task=copy", "data.train_lengths=5,2"], ["data.train_lengths=(5, 2)", "min <= max"]),
    (["data.train_lengths=1,2,3"], ["data.train_lengths='1,2,3' is not a valid tuple of 2 ints"]),
    (["data.eval_lengths=1.5,2"], ["data.eval_lengths='1.5,2' is not a valid tuple of 2 ints"]),
    (["data.eval_lengths=11"], ["data.eval_lengths='11' is not a valid tuple of 2 ints"]),
    (["train.learning_rate=0"], ["train.learning_rate=0.0 must be positive"]),
    (["train.learning_rate=nan"], ["train.learning_rate=nan must be a finite number"]),
    (["train.adam_b1=1.0"], ["train.adam_b1=1.0 must be in [0, 1)"]),
    (["train.adam_b2=-0.1"], ["train.adam_b2=-0.1 must be in [0, 1)"]),
    (["train.adam_eps=0"], ["train.adam_eps=0.0 must be positive"]),
    (["train.grad_clip_norm=-1"], ["train.grad_clip_norm=-1.0 must be >= 0"]),
    (["train.weight_decay=-1"], ["train.weight_decay=-1.0 must be >= 0"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1 must be >= 0"]),
    (["train.peak_flops=-1"], ["train.peak_flops=-1.0 must be >= 0"]),
    (["train.label_smoothing=1"], ["train.label_smoothing=1.0 must be in [0, 1)"]),
    (["train.seed=-3"], ["train.seed=-3 must be >= 0"]),
    (["train.steps=0"], ["train.steps=0 must be positive"]),
    (["train.steps=many"], ["train.steps='many' is not a valid int"]),
    (["train.stepz=5"], ["unknown config key train.stepz", "did you mean train.steps?"]),
    (["train.batch_size=7"], ["train.batch_size=7 is not divisible by the 8 devices"]),
    (["data.shuffle_seed=-5"], ["data.shuffle_seed=-5 must be >= 0, or -1"]),
    (["decode.alpha=inf"], ["decode.alpha=inf must be a finite number"]),
    (["decode.beam_size=0"], ["decode.beam_size=0 must be positive"]),
    (["eval.num_samples=-1"], ["eval.num_samples=-1 must be >= 0"]),
    (["eval.bleu_examples=0"], ["eval.bleu_examples=0 must be positive"]),
    (["model.dropout_rate=1.5"], ["model.dropout_rate=1.5 must be in [0, 1)"]),
    (["model.num_heads=3"], ["model.d_model=32 is not divisible by model.num_heads=3"]),
    (["model.pos_encoding=rotary"], ["model.pos_encoding='rotary' is not allowed"]),
    (["model.max_len=16"], ["data.max_len=24 exceeds model.max_len=16"]),
    (["checkpoint.keep_best=bleux"], ["checkpoint.keep_best='bleux' is not allowed"]),
    (["train.early_stop_patience=-1"], ["train.early_stop_patience=-1 must be >= 0"]),
    (["train.early_stop_patience=2"],
     ["train.early_stop_patience=2 needs checkpoint.keep_best", "=loss, accuracy or bleu"]),
    (["data.vocab_character_coverage=0"], ["data.vocab_character_coverage=0.0 must be in (0, 1]"]),
    (["data.task=text", "data.train_files={x}/pairs.tsv"],
     ["data.task='text' needs data.validation_files"]),
    (["data.task=text", "data.train_files=a.src", "data.validation_files={x}/pairs.tsv"],
     ["data.train_files='a.src' must be '<source file>,<target file>' or '<file>.tsv'"]),
    (["data.task=text", "data.train_files={x}/missing.tsv", "data.validation_files={x}/pairs.tsv"],
     ["missing.tsv: file not found"]),
    (["data.task=text", "data.train_files={x}/pairs.tsv",
      "data.validation_files={x}/pairs.tsv", "data.test_files={x}/missing.tsv"],
     ["missing.tsv: file not found"]),
    (["data.task=text", "data.train_files={x}/latin1.tsv", "data.validation_files={x}/pairs.tsv"],
     ["latin1.tsv:2: invalid UTF-8"]),
    (["data.task=text", "data.train_files={x}/one.src,{x}/two.tgt",
      "data.validation_files={x}/pairs.tsv"], ["one.src has 1 lines but", "two.tgt has 2"]),
    (["data.task=tfds", "data.data_dir={x}/no_tfds_here"], ["is not prepared in", "jaxformer prepare"]),
]

EXPERIMENT_CASES = [
    ("syntax.py", ["syntax.py:1: syntax error in the experiment file"]),
    ("not_a_config.py", ["not_a_config.py: get_config() returned a int"]),
    ("wrong_type.py", ["wrong_type.py:4: the experiment file raised TypeError", "'steps'"]),
    ("unknown_key.py", ["unknown_key.py: unknown config key train.stepz"]),
    ("import_error.py", ["import_error.py:1: the experiment file raised ModuleNotFoundError"]),
    ("raises.py", ["raises.py:2: the experiment file raised ValueError: boom"]),
    ("no_get_config.py", ["no_get_config.py defines no get_config()"]),
    ("does_not_exist", ["experiment 'does_not_exist' not found"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The experiment files and text files of the cases, in one directory."""
  directory = tmp_path_factory.mktemp("bad_input_files")
  for name, text in EXPERIMENT_FILES.items():
    (directory / name).write_text(text)
  (directory / "pairs.tsv").write_text("one\tuno\ntwo\tdos\n")
  (directory / "latin1.tsv").write_bytes("one\tuno\nse\xf1or\tsir\n".encode("latin-1"))
  (directory / "one.src").write_text("one\n")
  (directory / "two.tgt").write_text("uno\ndos\n")
  (directory / "a_file").write_text("not a directory\n")
  return str(directory)


def one_error_line(capsys, status, *fragments) -> str:
  """Status 2, nothing on stdout, and exactly one line on stderr, 'error: ...', holding every
  fragment (a traceback would have failed the test already: main runs in this process)."""
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert status == 2, captured.err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-3000:]
  assert captured.out == ""
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def train_args(runs, workdir, overrides, experiment="default"):
  args = runs.train_args(workdir)
  args[args.index("--config") + 1] = experiment
  return args + [f"--config.{o}" for o in overrides]


@pytest.mark.parametrize("overrides, fragments", TRAIN_CASES,
                         ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_a_bad_config_or_data_file_stops_train_before_it_writes(runs, files, tmp_path, capsys,
                                                                overrides, fragments):
  workdir = str(tmp_path / "never_created")
  overrides = [o.replace("{x}", files) for o in overrides]
  status = cli.main(train_args(runs, workdir, overrides))
  one_error_line(capsys, status, *fragments)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("name, fragments", EXPERIMENT_CASES, ids=[c[0] for c in EXPERIMENT_CASES])
def test_whatever_an_experiment_file_does_wrong_is_one_line(runs, files, tmp_path, capsys,
                                                            name, fragments):
  workdir = str(tmp_path / "never_created")
  experiment = os.path.join(files, name) if name.endswith(".py") else name
  status = cli.main(train_args(runs, workdir, [], experiment=experiment))
  one_error_line(capsys, status, *fragments)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("where, fragments", [
    ("a_file", ["is a file, not a directory"]),
    ("a_file/run", ["cannot be created", "is a file"]),
])
def test_a_workdir_that_cannot_be_a_directory_is_one_line(runs, files, capsys, where, fragments):
  before = open(os.path.join(files, "a_file")).read()
  status = cli.main(train_args(runs, os.path.join(files, where), []))
  one_error_line(capsys, status, *fragments)
  assert open(os.path.join(files, "a_file")).read() == before


@pytest.fixture(scope="module")
def trained(runs, tmp_path_factory):
  """A copy of the reference run, not to be changed by the tests that use it."""
  return run_testing.copy_workdir(runs.reference(),
                                  str(tmp_path_factory.mktemp("bad_input") / "trained"))


def listing(workdir):
  """Every file under `workdir` with its size: what a command must leave as it was."""
  return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
          for d, _, names in os.walk(workdir) for f in names}


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "--beam-size", "0"], ["argument --beam-size: 0 must be at least 1"]),
    (["evaluate", "--samples", "-1"], ["argument --samples: -1 must be at least 0"]),
    (["evaluate", "--alpha", "nan"], ["argument --alpha: nan must be a finite number"]),
    (["evaluate", "--step", "7"], ["no checkpoint at step 7", "available steps"]),
    (["translate", "--beam-size", "0"], ["argument --beam-size: 0 must be at least 1"]),
    (["translate", "--batch-size", "0"], ["argument --batch-size: 0 must be at least 1"]),
    (["translate", "--output", "{x}/no_such_dir/out.txt"], ["the directory", "does not exist"]),
    (["translate", "--output", "{x}"], ["is a directory; give a file name"]),
    (["plot", "attention", "--text", "one", "--out", "{x}/no_such_dir/a.png"],
     ["the directory", "does not exist"]),
    (["plot", "attention", "--text", "one", "--out", "{x}/a.xyz"], ["xyz is not an image format"]),
    (["average", "--last", "0"], ["argument --last: 0 must be at least 1"]),
    (["average", "--last", "2", "--step", "20"],
     ["cannot average the last 2 checkpoints up to step 20", "has 1 at or before it"]),
    (["evaluate", "--max-examples", "0"], ["argument --max-examples: 0 must be at least 1"]),
    (["evaluate", "--hypotheses", "{x}"], ["--hypotheses", "is a directory; give a file name"]),
    (["evaluate", "--hypotheses", "{x}/no_such_dir/h.txt"], ["the directory", "does not exist"]),
    # The reference run keeps no best step (checkpoint.keep_best is not set).
    *[(command + ["--step", "best"],
       ["--step best: the run in", "kept no best checkpoint (checkpoint.keep_best is not set",
        "choose a step with --step N (available steps: 20, 30, 40)"])
      for command in (["evaluate"], ["translate"], ["plot", "attention", "--text", "one"],
                      ["average", "--last", "1"])],
    (["train", "--restore-step", "-1"], ["argument --restore-step: -1 must be at least 0"]),
])
def test_a_bad_flag_or_output_path_is_one_line_before_any_work(trained, tmp_path, capsys, args,
                                                               fragments):
  before = listing(trained)
  args = [a.replace("{x}", str(tmp_path)) for a in args]
  status = cli.main(args[:2] + ["--workdir", trained] + args[2:] if args[0] == "plot"
                    else args[:1] + ["--workdir", trained] + args[1:])
  one_error_line(capsys, status, *fragments)
  assert listing(trained) == before
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [["evaluate"], ["translate"], ["plot", "positions"],
                                     ["plot", "curves"], ["average", "--last", "1"],
                                     ["prepare"]])
def test_a_workdir_that_is_a_file_is_one_line_for_every_command(files, capsys, command):
  a_file = os.path.join(files, "a_file")
  status = cli.main(command[:2] + ["--workdir", a_file] + command[2:] if command[0] == "plot"
                    else command[:1] + ["--workdir", a_file] + command[1:])
  one_error_line(capsys, status, a_file, "is a file")
  assert open(a_file).read() == "not a directory\n"


def test_info_depth_zero_is_one_line(capsys):
  one_error_line(capsys, cli.main(["info", "--depth", "0"]), "--depth: 0 must be at least 1")


@pytest.mark.parametrize("edit, fragments", [
    (lambda text: text[:len(text) // 2], ["config.json is not a valid config file"]),
    (lambda text: text.replace('"beam_size": 4', '"beam_size": "four"'),
     ["config.json: decode.beam_size='four' should be a int"]),
    (lambda text: text.replace('"beam_size": 4', '"beam_size": 0'),
     ["config.json: decode.beam_size=0 must be positive"]),
    (lambda text: text.replace('"train_lengths": [\n      1,\n      8\n    ]',
                               '"train_lengths": [1]'),
     ["config.json: data.train_lengths=[1] should be a tuple of 2 ints"]),
    (lambda text: "[1, 2]", ["holds a JSON list, not a config object"]),
])
@pytest.mark.parametrize("command", ["evaluate", "translate"])
def test_a_hand_edited_config_json_is_one_line(trained, tmp_path, capsys, edit, fragments, command):
  workdir = run_testing.copy_workdir(trained, str(tmp_path / "edited"))
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    text = edit(f.read())
  assert text != open(path).read()
  with open(path, "w") as f:
    f.write(text)
  before = listing(workdir)
  one_error_line(capsys, cli.main([command, "--workdir", workdir]), *fragments)
  assert listing(workdir) == before


def _copy_without(trained, tmp_path, *names):
  """A copy of the trained run without the files or directories `names` (relative paths)."""
  copy = run_testing.copy_workdir(trained, str(tmp_path / "source"))
  for name in names:
    path = os.path.join(copy, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return copy


# (the --init-from source made from the trained run (steps 20, 30, 40) in a temporary directory,
# more arguments, fragments of the one error line).
INIT_FROM_CASES = [
    (lambda trained, tmp: trained, ["--config.model.d_ff=128"],
     ["error: --init-from ", "the model differs from the source's: model.d_ff (64 in the "
      "source, 128 here)", "set these keys as its config.json has them"]),
    (lambda trained, tmp: trained, ["--config.model.vocab_size=128", "--config.model.norm=pre"],
     ["model.vocab_size (64 in the source, 128 here), model.norm ('post' in the source, 'pre' "
      "here)"]),
    (lambda trained, tmp: f"{trained}:7", [], ["no checkpoint at step 7", "available steps: "
                                               "20, 30, 40"]),
    (lambda trained, tmp: f"{trained}:best", [], ["kept no best checkpoint"]),
    (lambda trained, tmp: str(tmp / "missing"), [], ["missing does not exist; train first"]),
    (lambda trained, tmp: _copy_without(trained, tmp, "checkpoints"), [], ["no checkpoints in"]),
    (lambda trained, tmp: _copy_without(trained, tmp, "config.json"), [],
     ["config.json is missing, so which model its checkpoints hold is unknown"]),
    (lambda trained, tmp: _copy_without(trained, tmp, "vocab.model"), [],
     ["vocab.model is missing: the source's parameters need the vocabulary"]),
    (lambda trained, tmp: _copy_without(trained, tmp, "checkpoints/40/state/_METADATA"), [],
     ["checkpoint at step 40 in", "is damaged (missing state/_METADATA)"]),
    (lambda trained, tmp: trained, ["--config.train.init_from=elsewhere"],
     ["and --config.train.init_from=elsewhere differ; give the source once"]),
]


@pytest.mark.parametrize("make_source, args, fragments", INIT_FROM_CASES,
                         ids=[" ".join(c[2])[:60] for c in INIT_FROM_CASES])
def test_a_source_that_cannot_start_a_fine_tuning_run_is_one_line_before_any_write(
    runs, trained, tmp_path, capsys, make_source, args, fragments):
  source = make_source(trained, tmp_path)
  before = listing(source)
  workdir = str(tmp_path / "never_created")
  status = cli.main(train_args(runs, workdir, []) + ["--init-from", source] + args)
  one_error_line(capsys, status, *fragments)
  assert not os.path.exists(workdir)
  assert listing(source) == before  # The source is only read.
