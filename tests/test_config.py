"""The configuration: loading, overrides, and `validate`, the one value validator (the model,
the schedules and the parallel strategies check nothing themselves)."""

import json

import pytest

from jaxformer import config as config_lib
from jaxformer.errors import ConfigError

from tests.model.model_testing import tiny_config as tiny_model_config


def default_config_with(**settings):
  """The default config with `settings` ('section.key': value), not validated."""
  c = config_lib.get_default_config()
  for key, value in settings.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_default_experiment_loads_and_validates():
  config = config_lib.load_config("default")
  assert config.data.task == "numbers"
  assert config.model.d_model % config.model.num_heads == 0


def test_override_is_parsed_as_the_schema_type():
  config = config_lib.load_config("default", {"train.steps": "7", "model.norm": "pre",
                                              "model.share_embeddings": "false",
                                              "train.learning_rate": "3"})
  assert config.train.steps == 7 and isinstance(config.train.steps, int)
  assert config.model.norm == "pre"
  assert config.model.share_embeddings is False
  assert config.train.learning_rate == 3.0 and isinstance(config.train.learning_rate, float)


def test_misspelt_key_names_the_closest_valid_key():
  with pytest.raises(ConfigError, match=r"unknown config key train\.stpes; did you mean train\.steps"):
    config_lib.load_config("default", {"train.stpes": "5"})


def test_wrong_type_names_the_key():
  with pytest.raises(ConfigError, match=r"train\.steps='many' is not a valid int"):
    config_lib.load_config("default", {"train.steps": "many"})


@pytest.mark.parametrize("key,value,match", [
    ("model.num_heads", "3", r"model\.d_model=128 is not divisible by model\.num_heads=3"),
    ("model.pos_encoding", "rotary", r"model\.pos_encoding='rotary' is not allowed; choose one of 'sinusoidal', 'learned'"),
    ("model.norm", "batch", r"model\.norm='batch' is not allowed; choose one of 'post', 'pre'"),
    ("train.steps", "0", r"train\.steps=0 must be positive"),
])
def test_impossible_values_are_refused(key, value, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.load_config("default", {key: value})


def test_unknown_experiment_lists_the_available_ones():
  with pytest.raises(ConfigError, match=r"experiment 'nope' not found.*available: .*default"):
    config_lib.load_config("nope")


def test_json_round_trip():
  config = config_lib.load_config("default", {"data.train_lengths": "2,9"})
  again = config_lib.from_json(config_lib.to_json(config))
  assert again == config
  assert again.data.train_lengths == (2, 9)


def test_override_args_parsing():
  assert config_lib.parse_override_args(
      ["--config.train.steps=3", "--config.model.norm", "pre"]) == {
          "train.steps": "3", "model.norm": "pre"}
  with pytest.raises(ConfigError, match="unexpected argument"):
    config_lib.parse_override_args(["--steps=3"])


def test_the_defaults_are_valid():
  config_lib.validate(config_lib.get_default_config())


def test_a_hand_edited_run_config_is_validated_when_read():
  raw = json.loads(config_lib.to_json(config_lib.get_default_config()))
  raw["model"]["num_heads"] = 3
  with pytest.raises(ConfigError,
                     match=r"model\.d_model=512 is not divisible by model\.num_heads=3"):
    config_lib.from_json(json.dumps(raw))


# The model's settings, checked on the model section alone (the model is built from it).
BAD_SETTINGS = [
    (dict(d_model=30, num_heads=4), "model.d_model=30 is not divisible by model.num_heads=4"),
    (dict(pos_encoding="rotary"), "model.pos_encoding='rotary'.*'sinusoidal', 'learned'"),
    (dict(norm="sandwich"), "model.norm='sandwich'.*'post', 'pre'"),
    (dict(activation="mish"), "model.activation='mish'.*'relu', 'gelu', 'swish'"),
    (dict(sinusoid_layout="blocks"), "model.sinusoid_layout='blocks'.*'interleaved', 'half'"),
    (dict(layer_norm_epsilon=0.0), "model.layer_norm_epsilon=0.0 must be positive"),
    (dict(final_logits_bias=True, tie_output=False), "model.final_logits_bias=True needs "
     "model.tie_output=True"),
    (dict(dtype="float16"), "model.dtype='float16'.*'float32', 'bfloat16'"),
    (dict(remat="some"), "model.remat='some'.*'none', 'full', 'dots'"),
    (dict(d_model=15, num_heads=5), "model.d_model=15 must be even"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate_model(tiny_model_config(**settings))


def test_cosine_needs_steps_after_warmup():
  config = default_config_with(**{"train.schedule": "cosine", "train.warmup_steps": 10,
                                  "train.steps": 10})
  with pytest.raises(ConfigError, match="train.steps"):
    config_lib.validate(config)


def test_rsqrt_warmup_needs_warmup_steps():
  with pytest.raises(ConfigError,
                     match=r"train\.schedule='rsqrt_warmup' needs train\.warmup_steps > 0"):
    config_lib.validate(default_config_with(**{"train.warmup_steps": 0}))


def test_fsdp_needs_mesh():
  with pytest.raises(ConfigError, match=r"parallel\.fsdp=2 needs parallel\.strategy='mesh'"):
    config_lib.validate(default_config_with(**{"parallel.fsdp": 2,
                                               "parallel.strategy": "pmap"}))
