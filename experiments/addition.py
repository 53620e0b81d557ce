"""Addition: "1 2 3 + 4 5" -> "1 6 8", operands of 1 to 8 digits each.

tensor2tensor's classic algorithmic tasks use the digits 0-9 as symbols, written with spaces
("3 1 4") so that every digit is one token. The model is small, sized to train on a CPU. To
test length generalisation, give the evaluation splits longer inputs than training:
--config.data.eval_lengths=11,16 (and a data.max_len that fits them).
"""

from jaxformer.config import load_experiment


def get_config():
  config = load_experiment("copy")
  config.data.task = "addition"
  config.data.train_lengths = (1, 8)  # digits per operand
  config.data.eval_lengths = (1, 8)
  config.model.num_layers = 3         # carrying is harder than copying: a larger model, longer.
  config.model.d_model = 128
  config.model.d_ff = 512
  config.train.steps = 4000
  # copy's learning rate (2.0: a peak of 0.0125 for d_model 128) leaves this model at chance, the
  # loss stuck at ln(10) = 2.3 after 800 steps; 0.5 (peak 0.0031) learns.
  config.train.learning_rate = 0.5
  return config
