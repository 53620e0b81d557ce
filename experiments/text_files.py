"""Your own parallel text: the sample English -> Spanish sentences in experiments/data/.

A template for training on your files: one sentence per line in aligned '<x>.src' / '<x>.tgt'
files (line i of one translates line i of the other), or one 'source<TAB>target' pair per line
in a '.tsv' file. Point the three data.*_files keys at them, here or on the command line:

  ./launch.sh text_files --config.data.train_files=/data/train.en,/data/train.es

(a '.src,.tgt' pair may have any extensions; a single file must end in .tsv). Relative paths are
taken from the current directory. The sample files are 400 / 60 / 60 simple sentences made from
a small grammar: enough to see a model learn word order and agreement, not to translate.
"""

import os

from jaxformer.config import get_default_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config():
  config = get_default_config()
  config.data.task = "text"
  config.data.train_files = f"{DATA}/en_es_train.src,{DATA}/en_es_train.tgt"
  config.data.validation_files = (f"{DATA}/en_es_validation.src,"
                                  f"{DATA}/en_es_validation.tgt")
  config.data.test_files = f"{DATA}/en_es_test.tsv"
  config.data.max_len = 32
  config.model.vocab_size = 256
  config.model.num_layers = 2
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.d_ff = 512
  config.model.max_len = 64
  config.model.dropout_rate = 0.1
  config.train.steps = 1500
  config.train.batch_size = 32
  config.train.warmup_steps = 200
  config.train.learning_rate = 2.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 500
  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 3
  config.eval.bleu_examples = 60
  return config
