import pytest

from jaxformer import config as config_lib
from jaxformer.errors import ConfigError


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
