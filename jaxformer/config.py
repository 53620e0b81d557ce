"""The configuration: defaults (the schema), loading experiments, overrides, validation.

One `ml_collections.ConfigDict` is the single source of truth for a run. `get_default_config()`
below is its schema: every key that exists, with its default and (through that default) its
type. An experiment file `experiments/<name>.py` defines `get_config()`, which starts from these
defaults and changes what the experiment needs. The command line may then override any key as
`--config.train.steps=100`. `load_config()` does all three and validates the result, so a
misspelt key or an impossible value stops the run before any work with one clear line.

The schema is assembled from one function per section (`_model_defaults`, `_data_defaults`, ..).
`validate()` is the one value validator (`validate_model()` checks the model section alone);
a run config read back by `from_json()` passes it too, so the model, the learning-rate schedules
and the parallel strategies trust their config and check nothing themselves. The checks that
need to know the devices are `jaxformer.devices.validate_for_devices`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import traceback
from typing import Any, Callable, Iterable

import ml_collections

from jaxformer.errors import ConfigError

# Inside the package, so that an installed wheel has its experiments too: in the repository
# jaxformer/experiments is a symlink to the top-level experiments/, which the build copies in.
# Resolved, so that messages and run configs name the files where the user keeps them.
EXPERIMENTS_DIR = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "experiments"))


def _model_defaults() -> ml_collections.ConfigDict:
  """The Transformer itself (jaxformer/model). Defaults are the paper's base model."""
  s = ml_collections.ConfigDict()
  s.vocab_size = 37000              # V: shared source/target SentencePiece vocabulary size.
  s.num_layers = 6                  # N: layers in the encoder and (as many) in the decoder.
  s.d_model = 512                   # D
  s.num_heads = 8                   # H; head dim K = D / H.
  s.d_ff = 2048                     # F: inner size of the position-wise feed-forward network.
  s.dropout_rate = 0.1              # residual dropout and dropout on embeddings + positions.
  s.attention_dropout_rate = 0.0    # dropout on attention weights (the paper uses none).
  s.pos_encoding = "sinusoidal"     # 'sinusoidal' | 'learned'
  s.max_len = 256                   # longest sequence (positions) the model accepts.
  s.norm = "post"                   # 'post' (the paper) | 'pre'
  s.activation = "relu"             # 'relu' (the paper) | 'gelu' (tanh approximation) |
                                    # 'swish' (SiLU, x * sigmoid(x): most Opus-MT models).
  s.share_embeddings = True         # one embedding table for source and target.
  s.tie_output = True               # logits = decoder output @ target embedding^T.
  s.attention_bias = True           # biases in the Q, K, V and output projections.
  s.final_logits_bias = False       # a learned [V] bias added to the tied output projection's
                                    # logits (Marian's final_logits_bias); needs tie_output
                                    # (the untied projection has a bias of its own).
  s.layer_norm_epsilon = 1e-6       # added to the variance in every LayerNorm (HF Marian and
                                    # PyTorch use 1e-5).
  s.sinusoid_layout = "interleaved" # where sinusoidal positions put cos: 'interleaved' (the
                                    # paper: sin at even dims, cos at odd) | 'half' (Marian,
                                    # fairseq: sin in the first half of the dims, cos in the
                                    # second), which an imported Opus-MT model keeps.
  s.dtype = "float32"               # compute dtype: 'float32' | 'bfloat16'. Params stay float32.
  s.scan_layers = False             # nn.scan over layers (compile time independent of depth).
  s.remat = "none"                  # rematerialisation per layer: 'none' | 'full' | 'dots'.
  s.attention_kernel = "auto"       # 'auto' (cuDNN's fused kernel on GPU in bfloat16/float16,
                                    # else 'xla') | 'xla' (einsums compiled by XLA) | 'cudnn'.
  return s


def _data_defaults() -> ml_collections.ConfigDict:
  """Input data (jaxformer/data)."""
  s = ml_collections.ConfigDict()
  s.task = "numbers"                # 'numbers' | 'numbers_es_en' | 'copy' | 'reverse' | 'sort'
                                    # | 'addition' | 'text' | 'tfds'
  s.data_dir = ""                   # where tfds datasets live; '' = <workdir>/tfds.
  s.num_train = 20000               # generated tasks: examples per split.
  s.num_validation = 1000
  s.num_test = 1000
  s.train_lengths = (1, 8)          # algorithmic tasks: (min, max) input length per split.
  s.eval_lengths = (1, 8)           # validation and test.
  s.train_files = ""                # 'text' task: '<path>.src,<path>.tgt' or '<path>.tsv'.
  s.validation_files = ""
  s.test_files = ""
  s.tfds_name = "wmt14_translate/de-en"  # 'tfds' task: catalog dataset.
  s.direction = "en-de"             # 'tfds' task: '<source>-<target>' language codes.
  s.vocab_type = "unigram"          # SentencePiece model: 'unigram' | 'bpe'.
  s.vocab_sample_size = 200000      # at most this many sentences (both sides) train the vocab.
  s.vocab_character_coverage = 1.0  # share of characters the vocab must cover (SentencePiece;
                                    # 0.9995 for noisy web text, 1.0 keeps every character).
  s.max_len = 64                    # tokens per row (source and target each), eos included.
  s.length_policy = "drop"          # pairs longer than max_len: 'drop' | 'truncate'.
  s.packing = True                  # pack several pairs per row (segment ids and positions).
  s.shuffle_seed = -1               # -1 = train.seed.
  return s


def _train_defaults() -> ml_collections.ConfigDict:
  """Training (jaxformer/train)."""
  s = ml_collections.ConfigDict()
  s.steps = 100000
  s.batch_size = 128                # global rows per step (a row holds one pair, or several
                                    # packed pairs), summed over every device and host.
  s.seed = 0
  s.learning_rate = 1.0             # multiplies the schedule ('rsqrt_warmup': the paper's 1.0).
  s.schedule = "rsqrt_warmup"       # 'rsqrt_warmup' (the paper) | 'cosine' | 'constant'
  s.warmup_steps = 4000
  s.adam_b1 = 0.9
  s.adam_b2 = 0.98
  s.adam_eps = 1e-9
  s.weight_decay = 0.0
  s.label_smoothing = 0.1
  s.grad_clip_norm = 0.0            # 0 = no clipping.
  s.grad_accum_steps = 1            # micro-batches per update (batch_size is per micro-batch).
  s.log_every_steps = 100
  s.eval_every_steps = 1000
  s.peak_flops = 0.0                # per device, for MFU; 0 = measure a matmul at start.
  s.init_from = ""                  # fine-tuning: 'SOURCE[:STEP|best]', a workdir whose
                                    # parameters start the run ('' = fresh ones); config.json
                                    # records it resolved, 'SOURCE:STEP'.
  s.early_stop_patience = 0         # stop after this many evaluations in a row without an
                                    # improvement of checkpoint.keep_best's metric; 0 = off.
  return s


def _parallel_defaults() -> ml_collections.ConfigDict:
  """Spreading the work over devices (jaxformer/train/parallel.py)."""
  s = ml_collections.ConfigDict()
  s.strategy = "mesh"               # 'mesh' (jit + NamedSharding) | 'pmap'
  s.fsdp = 1                        # devices that shard params and optimizer state (mesh only).
  return s


def _checkpoint_defaults() -> ml_collections.ConfigDict:
  """Checkpoints (jaxformer/checkpoint.py)."""
  s = ml_collections.ConfigDict()
  s.every_steps = 1000
  s.keep = 5                        # newest checkpoints kept.
  s.keep_best = ""                  # '' or a validation metric ('loss', 'bleu') to keep the best.
  return s


def _decode_defaults() -> ml_collections.ConfigDict:
  """Decoding (jaxformer/decode.py)."""
  s = ml_collections.ConfigDict()
  s.beam_size = 4
  s.alpha = 0.6                     # length penalty ((5 + len) / 6) ** alpha.
  s.max_extra_len = 50              # output length <= input length + this, capped by max_len.
  return s


def _eval_defaults() -> ml_collections.ConfigDict:
  """Evaluation (jaxformer/evaluate.py)."""
  s = ml_collections.ConfigDict()
  s.batch_size = 64                 # global rows per evaluation batch.
  s.bleu_examples = 256             # validation sentences decoded for BLEU during training.
  s.num_samples = 5                 # sample translations printed and logged.
  return s


def get_default_config() -> ml_collections.ConfigDict:
  """Every configuration key with its default value. The paper's base model is the default."""
  c = ml_collections.ConfigDict()
  c.model = _model_defaults()
  c.data = _data_defaults()
  c.train = _train_defaults()
  c.parallel = _parallel_defaults()
  c.checkpoint = _checkpoint_defaults()
  c.decode = _decode_defaults()
  c.eval = _eval_defaults()
  return c


# --- Validation. -----------------------------------------------------------------------------

# The allowed values of the settings that name a choice.
CHOICES = {
    "model.pos_encoding": ("sinusoidal", "learned"),
    "model.norm": ("post", "pre"),
    "model.activation": ("relu", "gelu", "swish"),
    "model.sinusoid_layout": ("interleaved", "half"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention_kernel": ("auto", "xla", "cudnn"),
    "data.task": ("numbers", "numbers_es_en", "copy", "reverse", "sort", "addition", "text",
                  "tfds"),
    "data.vocab_type": ("unigram", "bpe"),
    "data.length_policy": ("drop", "truncate"),
    "train.schedule": ("rsqrt_warmup", "cosine", "constant"),
    "parallel.strategy": ("mesh", "pmap"),
    "checkpoint.keep_best": ("", "loss", "accuracy", "bleu"),
}

# Settings that count something (sizes, steps, devices) and must be at least 1.
POSITIVE = (
    "model.vocab_size", "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff",
    "model.max_len", "data.max_len", "data.num_train", "data.num_validation", "data.num_test",
    "data.vocab_sample_size", "train.steps", "train.batch_size", "train.grad_accum_steps",
    "train.log_every_steps", "train.eval_every_steps", "parallel.fsdp", "checkpoint.every_steps",
    "checkpoint.keep", "decode.beam_size", "eval.batch_size", "eval.bleu_examples",
    "train.learning_rate", "train.adam_eps", "model.layer_norm_epsilon",
)

# Settings that may be 0 (off, none) but not negative.
NON_NEGATIVE = (
    "train.seed", "train.warmup_steps", "train.weight_decay", "train.grad_clip_norm",
    "train.peak_flops", "train.early_stop_patience", "decode.max_extra_len", "eval.num_samples",
)

# Rates and shares that must lie in [0, 1).
FRACTIONS = ("model.dropout_rate", "model.attention_dropout_rate", "train.label_smoothing",
             "train.adam_b1", "train.adam_b2")

# (min, max) length pairs of the generated tasks: 1 <= min <= max.
LENGTH_RANGES = ("data.train_lengths", "data.eval_lengths")

# The files of the 'text' task, one key per split; the training run needs train and validation.
TEXT_FILES = {"train": "data.train_files", "validation": "data.validation_files",
              "test": "data.test_files"}
TEXT_FILES_NEEDED = ("train", "validation")


def _check_choice(key: str, value: Any) -> None:
  """Raises ConfigError unless `value` is one of the allowed values of `key`."""
  allowed = CHOICES[key]
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is not allowed; choose one of "
                      f"{', '.join(repr(a) for a in allowed)}")


def _float_keys() -> list[str]:
  """The keys whose schema type is float (every one must be finite)."""
  return [k for k, v in flatten(get_default_config()).items() if isinstance(v, float)]


def _check_keys(get: Callable[[str], Any], selected: Callable[[str], bool]) -> None:
  """The range checks of the keys that `selected` keeps; `get` reads one."""
  for key in filter(selected, CHOICES):
    _check_choice(key, get(key))
  for key, value in ((k, get(k)) for k in filter(selected, _float_keys())):
    if not math.isfinite(value):  # NaN passes every comparison below.
      raise ConfigError(f"{key}={value} must be a finite number")
  for key in filter(selected, POSITIVE):
    if get(key) <= 0:
      raise ConfigError(f"{key}={get(key)} must be positive")
  for key in filter(selected, NON_NEGATIVE):
    if get(key) < 0:
      raise ConfigError(f"{key}={get(key)} must be >= 0")
  for key in filter(selected, FRACTIONS):
    if not 0.0 <= get(key) < 1.0:
      raise ConfigError(f"{key}={get(key)} must be in [0, 1)")


def _in_model(key: str) -> bool:
  return key.startswith("model.")


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Checks the model section alone (`config.model`): a Transformer can be built from it.

  Part of `validate`; the model itself trusts its config and checks nothing. Raises ConfigError.
  """
  _check_keys(lambda key: model[key.removeprefix("model.")], _in_model)
  if model.d_model % model.num_heads:
    raise ConfigError(f"model.d_model={model.d_model} is not divisible by model.num_heads="
                      f"{model.num_heads}; each head needs d_model / num_heads dimensions")
  if model.pos_encoding == "sinusoidal" and model.d_model % 2:
    raise ConfigError(f"model.d_model={model.d_model} must be even for sinusoidal positions "
                      "(sin and cos pairs)")
  if model.final_logits_bias and not model.tie_output:
    raise ConfigError("model.final_logits_bias=True needs model.tie_output=True; the untied "
                      "output projection (tie_output=False) has its own bias already")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every value that can be checked without devices or data. Raises ConfigError.

  The one value validator: every config built from user input passes here (`load_config`,
  `from_json`, the benchmarks), and the model, the schedules and the parallel strategies trust
  what it let through. The checks that need the devices are `devices.validate_for_devices`.
  """
  validate_model(config.model)
  _check_keys(lambda key: get_key(config, key), lambda key: not _in_model(key))
  _check_data(config.data)
  if not 0.0 < config.data.vocab_character_coverage <= 1.0:
    raise ConfigError(f"data.vocab_character_coverage={config.data.vocab_character_coverage} "
                      "must be in (0, 1]")
  if config.data.max_len > config.model.max_len:
    raise ConfigError(f"data.max_len={config.data.max_len} exceeds model.max_len="
                      f"{config.model.max_len}; rows must fit the model's positions")
  t = config.train
  if t.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
  if t.schedule == "rsqrt_warmup" and t.warmup_steps == 0:
    raise ConfigError("train.schedule='rsqrt_warmup' needs train.warmup_steps > 0")
  if t.schedule == "cosine" and t.steps <= t.warmup_steps:
    raise ConfigError(f"train.schedule='cosine' needs train.steps={t.steps} > "
                      f"train.warmup_steps={t.warmup_steps} (the decay follows the warmup)")
  if t.early_stop_patience and not config.checkpoint.keep_best:
    raise ConfigError(f"train.early_stop_patience={t.early_stop_patience} needs "
                      "checkpoint.keep_best, the validation metric whose improvement it waits "
                      "for: set --config.checkpoint.keep_best=loss, accuracy or bleu")
  p = config.parallel
  if p.strategy == "pmap" and p.fsdp != 1:
    raise ConfigError(f"parallel.fsdp={p.fsdp} needs parallel.strategy='mesh'; pmap keeps a full "
                      "copy of the parameters on every device (set parallel.fsdp=1)")


def text_file_paths(spec: str, key: str) -> tuple[str, ...]:
  """'a.src,a.tgt' -> two absolute paths; 'a.tsv' -> one. `key` names the config key in errors.

  The one reading of a `data.*_files` value: validate checks it, the text dataset opens it.
  """
  paths = tuple(os.path.abspath(os.path.expanduser(p.strip())) for p in spec.split(",")
                if p.strip())
  if len(paths) not in (1, 2) or (len(paths) == 1 and not paths[0].endswith(".tsv")):
    raise ConfigError(f"{key}={spec!r} must be '<source file>,<target file>' or "
                      "'<file>.tsv' (source TAB target per line)")
  return paths


def _check_data(d: ml_collections.ConfigDict) -> None:
  """The data section's checks beyond single values: length ranges, seeds, the text files."""
  for key in LENGTH_RANGES:
    low, high = get_key(d, key.removeprefix("data."))
    if not 1 <= low <= high:
      raise ConfigError(f"{key}={(low, high)} must be (min, max) with 1 <= min <= max")
  if d.shuffle_seed < -1:
    raise ConfigError(f"data.shuffle_seed={d.shuffle_seed} must be >= 0, or -1 for train.seed")
  if d.task != "text":
    return
  for split, key in TEXT_FILES.items():
    spec = get_key(d, key.removeprefix("data."))
    if spec:
      text_file_paths(spec, key)
    elif split in TEXT_FILES_NEEDED:
      raise ConfigError(f"data.task='text' needs {key} ('<src>,<tgt>' or '<file>.tsv'): "
                        f"training reads the {split} split")


# --- Keys, overrides, loading. ---------------------------------------------------------------

def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'model.d_model': 512, ...} for every leaf key."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else "; `jaxformer info --keys` lists them all"
  return ConfigError(f"unknown config key {key}{hint}")


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _type_name(default: Any) -> str:
  """'int', 'float', 'tuple of 2 ints' ...: the schema's type of a key, for messages."""
  if isinstance(default, tuple):
    return f"tuple of {len(default)} {type(default[0]).__name__}s"
  return type(default).__name__


def _has_type(value: Any, default: Any) -> bool:
  """Whether `value` has the schema type of `default`. An int stands for a float; a bool is no
  int; a tuple (or a list, as JSON gives it back) needs the default's length and element type."""
  if isinstance(default, tuple):
    return (isinstance(value, (tuple, list)) and len(value) == len(default)
            and all(_has_type(v, d) for v, d in zip(value, default)))
  if isinstance(value, bool) != isinstance(default, bool):
    return False
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def _parse_value(key: str, text: str, default: Any) -> Any:
  """Parses `text` as the type of `default` (the schema's type for `key`)."""
  try:
    if isinstance(default, bool):
      lowered = text.lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, tuple):
      parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
      value = tuple(type(default[0])(p) for p in parts)
      if len(value) != len(default):
        raise ValueError
      return value
    return text
  except ValueError:
    raise ConfigError(f"{key}={text!r} is not a valid {_type_name(default)} "
                      f"(default {default!r})") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Sets each 'a.b' key to its value parsed as the schema's type. Unknown keys are errors."""
  known = flatten(config)
  for key, text in overrides.items():
    if key not in known:
      raise _unknown_key(key, known)
    value = _parse_value(key, text, known[key])
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value


def check_schema(config: ml_collections.ConfigDict, where: str,
                 unknown_keys_allowed: bool = False) -> None:
  """Every key of `config` exists in the defaults with a value of the same type.

  `where` (the experiment file or config.json) starts each message. With `unknown_keys_allowed`
  (a run config written by another version of jaxformer) keys the schema lacks are skipped.
  """
  defaults = flatten(get_default_config())
  for key, value in flatten(config).items():
    if key not in defaults:
      if unknown_keys_allowed:
        continue
      raise ConfigError(f"{where}: " + str(_unknown_key(key, defaults)))
    if not _has_type(value, defaults[key]):
      raise ConfigError(f"{where}: {key}={value!r} should be a {_type_name(defaults[key])} "
                        f"(default {defaults[key]!r})")


def resolve_experiment(name_or_path: str) -> str:
  """'default' -> experiments/default.py; a path to a .py file is taken as it is."""
  if name_or_path.endswith(".py") or os.sep in name_or_path:
    path = name_or_path
  else:
    path = os.path.join(EXPERIMENTS_DIR, name_or_path + ".py")
  if not os.path.isfile(path):
    available = sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR)
                       if f.endswith(".py") and not f.startswith("_"))
    raise ConfigError(f"experiment {name_or_path!r} not found (looked for {path}); "
                      f"available: {', '.join(available)}")
  return path


def _where_it_failed(error: BaseException, path: str) -> str:
  """'path:line' of the deepest frame of `error`'s traceback inside the experiment file `path`
  (or of a file it loaded), else `path`."""
  frames = traceback.extract_tb(error.__traceback__)
  inside = [f for f in frames if f.filename == path] or frames[-1:]
  return f"{inside[-1].filename}:{inside[-1].lineno}" if inside else path


def load_experiment(name_or_path: str) -> ml_collections.ConfigDict:
  """Runs the experiment file's get_config(); checks what it returns against the schema.

  Whatever the file does wrong (a syntax error, an exception while it runs, a get_config that
  returns no ConfigDict, a key or type the schema does not have) is one ConfigError naming the
  file (and line).
  """
  path = resolve_experiment(name_or_path)
  spec = importlib.util.spec_from_file_location(f"jaxformer_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config()
  except ConfigError:
    raise  # Already names its file (e.g. an experiment it builds on).
  except SyntaxError as e:
    raise ConfigError(f"{e.filename}:{e.lineno}: syntax error in the experiment file: "
                      f"{e.msg}") from None
  except Exception as e:  # Anything the user's code raises: its place and message.
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(f"{_where_it_failed(e, path)}: the experiment file raised "
                      f"{type(e).__name__}: {first_line}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}; return the "
                      "ConfigDict of jaxformer.config.get_default_config() with your changes")
  check_schema(config, path)
  return config


def load_config(experiment: str, overrides: dict[str, str] | None = None
                ) -> ml_collections.FrozenConfigDict:
  """Experiment file + command-line overrides, validated and frozen."""
  config = load_experiment(experiment)
  apply_overrides(config, overrides or {})
  validate(config)
  return ml_collections.FrozenConfigDict(config)


def parse_override_args(args: list[str]) -> dict[str, str]:
  """['--config.train.steps=100', '--config.model.norm', 'pre'] -> {'train.steps': '100', ...}."""
  overrides = {}
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unexpected argument {arg!r}; overrides look like "
                        "--config.train.steps=100")
    key = arg[len("--config."):]
    if "=" in key:
      key, value = key.split("=", 1)
    elif i + 1 < len(args):
      i += 1
      value = args[i]
    else:
      raise ConfigError(f"{arg} has no value; write --config.{key}=VALUE")
    overrides[key] = value
    i += 1
  return overrides


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str, where: str = "the run config") -> ml_collections.FrozenConfigDict:
  """The inverse of to_json (lists become tuples, as in the schema), validated and frozen.

  `where` names the file in errors: ConfigError for a wrong type or value, ValueError (from
  json) when the text is not JSON.
  """
  raw = json.loads(text)
  if not isinstance(raw, dict):
    raise ConfigError(f"{where} holds a JSON {type(raw).__name__}, not a config object")
  loaded = ml_collections.ConfigDict(raw)
  # A file may have been edited by hand, or written by another version (unknown keys: skipped).
  check_schema(loaded, where, unknown_keys_allowed=True)
  config = get_default_config()
  for key, value in flatten(loaded).items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        break
      node = node[part]
    else:
      if leaf in node:
        node[leaf] = tuple(value) if isinstance(value, list) else value
  try:
    validate(config)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  return ml_collections.FrozenConfigDict(config)
