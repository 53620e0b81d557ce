"""WMT14 English -> German, the paper's base model, on a TPU pod slice of 32 chips.

The model, data and schedule of experiments/wmt14_en_de_base.py; only the hardware changes. The
paper trained on 8 P100 GPUs with batches of about 25k source and 25k target tokens; here the
same batch is spread over 32 chips (e.g. a v5litepod-32 or v6e-32: 8 hosts x 4 chips):

  96 packed rows x 256 tokens = 24,576 token slots per side and step (about 25k; packing fills
  most of them), i.e. 3 rows per chip, 12 rows per host.

bfloat16 compute (parameters, optimizer state and the loss stay float32). Runs as:

  ./launch.sh wmt14_en_de_base_tpu32 --tpu NAME --zone ZONE --workdir gs://BUCKET/wmt14_base

after the tfds data are prepared once (see README, "Several hosts").
"""

from jaxformer.config import load_experiment

CHIPS = 32
ROWS_PER_CHIP = 3   # x data.max_len 256 tokens: 96 x 256 ~ 25k tokens per side and step.


def get_config():
  config = load_experiment("wmt14_en_de_base")  # experiments/wmt14_en_de_base.py
  config.model.dtype = "bfloat16"
  config.train.batch_size = CHIPS * ROWS_PER_CHIP   # 96 rows, as the base experiment
  config.eval.batch_size = CHIPS * 2                # any multiple of the 32 chips
  config.parallel.strategy = "mesh"
  config.parallel.fsdp = 1   # 65M parameters fit on every chip; no need to shard them.
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 5000
  config.checkpoint.every_steps = 2000   # the paper averaged the last 5 checkpoints
  config.checkpoint.keep = 5
  return config
