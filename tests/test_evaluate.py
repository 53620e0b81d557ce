"""jaxformer/evaluate.py: the metrics of a split from its batches, without a model.

Whole evaluations of a trained run (`jaxformer evaluate`, the training loop's validation) are
tested through the command line in tests/test_cli.py and tests/test_inference.py.
"""

import math

import numpy as np
import pytest
import sacrebleu

from jaxformer import evaluate
from jaxformer.tokens import EOS_ID


def test_exact_match_ignores_surrounding_and_repeated_spaces():
  hypotheses = ["a b", " a  b ", "a c", ""]
  references = ["a b", "a b", "a b", "x"]
  assert evaluate.exact_match(hypotheses, references) == pytest.approx(2 / 4)
  assert evaluate.exact_match([], []) == 0.0


def test_bleu_is_sacrebleus_corpus_score_with_its_signature():
  hypotheses = ["the cat sat on the mat", "a dog barked loudly today"]
  references = ["the cat sat on the mat", "the dog barked today"]
  score, signature = evaluate.bleu(hypotheses, references)
  assert score == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  assert 0.0 < score < 100.0
  assert evaluate.bleu(references, references)[0] == pytest.approx(100.0)
  assert signature.startswith("nrefs:1|")


def test_teacher_forced_metrics_divide_the_sums_of_every_batch_once():
  sums = [{"loss": 6.0, "nll": 4.0, "correct": 3.0, "num_tokens": 4.0},
          {"loss": 2.0, "nll": 2.0, "correct": 1.0, "num_tokens": 4.0}]
  batches = [{"index": 0}, {"index": 1}]
  metrics = evaluate.teacher_forced_metrics(lambda batch: sums[batch["index"]], batches)
  assert metrics["loss"] == pytest.approx(8.0 / 8)
  assert metrics["accuracy"] == pytest.approx(4.0 / 8)
  assert metrics["perplexity"] == pytest.approx(math.exp(6.0 / 8))
  assert metrics["num_tokens"] == 8 and isinstance(metrics["num_tokens"], int)


class LettersTokenizer:
  """Ids 4.. are the letters a, b, c, ...; decoding stops at EOS, as the real one does."""

  def decode(self, ids):
    letters = []
    for i in ids:
      if i == EOS_ID:
        break
      if i >= 4:
        letters.append(chr(ord("a") + i - 4))
    return "".join(letters)


def test_translate_batches_keys_by_example_id_and_drops_filler_rows():
  batches = [{"inputs": np.array([[4, 5], [6, 0]]), "example_ids": np.array([7, 3])},
             {"inputs": np.array([[5, 0], [0, 0]]), "example_ids": np.array([1, -1])}]

  def translate_fn(inputs):  # The "translation" of a row is the row itself, then EOS.
    return np.concatenate([inputs, np.full((len(inputs), 1), EOS_ID)], axis=1)

  got = evaluate.translate_batches(translate_fn, LettersTokenizer(), batches, width=5)
  assert got == {7: "ab", 3: "c", 1: "b"}  # The filler row (id -1) is not an example.
  assert evaluate.translate_batches(translate_fn, LettersTokenizer(), [], width=5) == {}
