"""Sort: "3 1 4 1" -> "1 1 3 4", inputs of 1 to 10 digits.

tensor2tensor's classic algorithmic tasks use the digits 0-9 as symbols, written with spaces
("3 1 4") so that every digit is one token. The model is small, sized to train on a CPU. To
test length generalisation, give the evaluation splits longer inputs than training:
--config.data.eval_lengths=11,16 (and a data.max_len that fits them).
"""

from jaxformer.config import load_experiment


def get_config():
  config = load_experiment("copy")
  config.data.task = "sort"
  return config
