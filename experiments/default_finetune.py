"""Fine-tuning: the default model (English -> Spanish number words) taught the other direction.

"tres mil cuatrocientos veintiuno" -> "three thousand four hundred twenty-one": the task
'numbers_es_en' uses the words of 'numbers', so the default run's vocabulary and embeddings fit
it. Train `default` first, then start this run from its parameters:

  jaxformer train --config default --workdir runs/default
  jaxformer train --config default_finetune --workdir runs/default_finetune \\
      --init-from runs/default          # its newest step; or runs/default:400

Only the parameters (and the vocabulary) come from runs/default: the optimizer state, the step,
the learning-rate schedule and the data position start afresh, so the schedule below is the
fine-tuning's own: a short warmup to a constant rate, lower than the default run's peak. Step 0
is saved as it came (and kept here, with every later save): `jaxformer evaluate --workdir
runs/default_finetune --step 0` measures the source on the new task. The model's shape must
stay the source's (a changed key is refused, by name); the run ends early once validation BLEU
has not improved for 3 evaluations in a row. Running the same command again resumes the
fine-tuning run from its own checkpoints.
"""

from jaxformer.config import load_experiment


def get_config():
  config = load_experiment("default")
  config.data.task = "numbers_es_en"
  config.train.steps = 400
  config.train.schedule = "constant"
  config.train.warmup_steps = 50
  config.train.learning_rate = 1e-3
  config.train.eval_every_steps = 50
  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 10           # every save of the run, step 0 (the source) included.
  config.checkpoint.keep_best = "bleu"
  config.train.early_stop_patience = 3
  return config
