"""WMT14 English -> German, the paper's big model (Vaswani et al. 2017, Table 3 "big").

N=6, d_model=1024, d_ff=4096, h=16, dropout 0.3, 300k steps; otherwise as base.
"""

from jaxformer.config import get_default_config


def get_config():
  config = get_default_config()
  config.data.task = "tfds"
  config.data.tfds_name = "wmt14_translate/de-en"
  config.data.direction = "en-de"
  config.data.max_len = 256                # pairs longer than this are dropped (and counted).
  config.data.length_policy = "drop"
  config.data.packing = True
  config.data.vocab_type = "bpe"           # the paper: byte-pair encoding, shared vocabulary.
  config.data.vocab_sample_size = 2_000_000  # sentences (1M pairs) that train the vocabulary.
  config.data.vocab_character_coverage = 0.9995  # web-crawled text holds stray scripts.
  config.model.vocab_size = 37000
  config.model.max_len = 256
  config.model.d_model = 1024
  config.model.d_ff = 4096
  config.model.num_heads = 16
  config.model.dropout_rate = 0.3
  config.train.steps = 300_000
  config.train.batch_size = 96
  config.train.warmup_steps = 4000
  return config
