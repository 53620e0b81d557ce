"""The data settings of the shipped experiments fit: vocabulary within model.vocab_size, pairs
within data.max_len (for generated tasks, on a smaller sample of the same distribution)."""

import pytest

from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, sources, vocab


@pytest.mark.parametrize("name", ["default", "copy", "reverse", "sort", "addition",
                                  "text_files"])
def test_experiment_data_fits_its_model(name, tmp_path):
  config = config_lib.load_experiment(name)
  if config.data.task != "text":
    config.data.num_train, config.data.num_validation, config.data.num_test = 3000, 200, 200
  config_lib.validate(config)
  tok = vocab.load_or_train(config, str(tmp_path))
  assert tok.vocab_size <= config.model.vocab_size
  data_dir = workdir_lib.resolve_data_dir(config, str(tmp_path))
  for split in sources.SPLITS:
    source = sources.get_split(config, split, data_dir)
    longest = max(max(len(ids) for ids in pipeline.tokenize(tok, source[i]).values())
                  for i in range(len(source)))
    assert longest <= config.data.max_len, (split, longest)
