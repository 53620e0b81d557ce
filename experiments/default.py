"""The default experiment: English number words -> Spanish number words.

"three thousand four hundred twenty-one" -> "tres mil cuatrocientos veintiuno". A task a learner
recognises, that cannot be solved by copying (different vocabularies, reordering, irregular
forms such as "quinientos" or "veintiuno"), with lengths that vary so that padding and masks
matter. A small Transformer learns it on two CPU cores in a few minutes.
"""

from jaxformer.config import get_default_config


def get_config():
  config = get_default_config()
  config.data.task = "numbers"
  config.data.num_train = 20000
  config.data.max_len = 32
  config.model.vocab_size = 256
  config.model.num_layers = 2
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.d_ff = 512
  config.model.max_len = 64
  config.model.dropout_rate = 0.1
  config.train.steps = 600
  config.train.batch_size = 64
  config.train.warmup_steps = 200
  config.train.grad_clip_norm = 1.0
  config.train.learning_rate = 0.5   # peak 0.5 * 128^-0.5 * 200^-0.5 = 0.0031
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 200
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 3
  config.eval.bleu_examples = 128
  return config
