"""WMT14 English -> German, the paper's base model (Vaswani et al. 2017, Table 3 "base").

N=6, d_model=512, d_ff=2048, h=8, dropout 0.1, label smoothing 0.1, a shared ~37k-token
vocabulary, Adam(0.9, 0.98, 1e-9) with 4000 warmup steps, 100k steps of about 25k source and
25k target tokens each. Needs the tfds download of wmt14_translate/de-en (see README).
"""

from jaxformer.config import get_default_config


def get_config():
  config = get_default_config()  # The defaults are the base model.
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
  config.train.steps = 100_000
  config.train.batch_size = 96    # 96 packed rows x 256 tokens ~ 25k tokens per side.
  config.train.warmup_steps = 4000
  config.decode.beam_size = 4
  config.decode.alpha = 0.6
  return config
