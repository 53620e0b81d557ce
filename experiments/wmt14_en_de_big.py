"""WMT14 English -> German, the paper's big model (Vaswani et al. 2017, Table 3 "big").

N=6, d_model=1024, d_ff=4096, h=16, dropout 0.3, 300k steps; otherwise as base.
"""

from jaxformer.config import load_experiment


def get_config():
  config = load_experiment("wmt14_en_de_base")
  config.model.d_model = 1024
  config.model.d_ff = 4096
  config.model.num_heads = 16
  config.model.dropout_rate = 0.3
  config.train.steps = 300_000
  return config
