"""Copy: "3 1 4" -> "3 1 4", inputs of 1 to 10 digits.

tensor2tensor's classic algorithmic tasks use the digits 0-9 as symbols, written with spaces
("3 1 4") so that every digit is one token. The model is small, sized to train on a CPU. To
test length generalisation, give the evaluation splits longer inputs than training:
--config.data.eval_lengths=11,16 (and a data.max_len that fits them).
"""

from jaxformer.config import get_default_config


def get_config():
  config = get_default_config()
  config.data.task = "copy"
  config.data.num_train = 20000
  config.data.num_validation = 1000
  config.data.num_test = 1000
  config.data.train_lengths = (1, 10)
  config.data.eval_lengths = (1, 10)
  config.data.max_len = 24
  config.model.vocab_size = 32    # digits, '+' and the special tokens: about 26 pieces.
  config.model.num_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.d_ff = 256
  config.model.max_len = 64
  config.model.dropout_rate = 0.0
  config.train.steps = 2000
  config.train.batch_size = 64
  config.train.warmup_steps = 200
  config.train.learning_rate = 2.0
  config.train.label_smoothing = 0.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 500
  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 3
  config.decode.beam_size = 1
  config.eval.bleu_examples = 128
  return config
