"""jaxformer/evaluate.py: the metrics of a split from its batches, without a model.

Whole evaluations of a trained run (`jaxformer evaluate`, the training loop's validation) are
tested through the command line in tests/test_cli.py and tests/test_inference.py.
"""

import math
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import types

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


def test_chrf_is_sacrebleus_corpus_score_with_its_signature():
  hypotheses = ["the cat sat on the mat", "a dog barked loudly today"]
  references = ["the cat sat on the mat", "the dog barked today"]
  score, signature = evaluate.chrf(hypotheses, references)
  assert score == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
  assert 0.0 < score < 100.0 and score != pytest.approx(evaluate.bleu(hypotheses, references)[0])
  assert evaluate.chrf(references, references)[0] == pytest.approx(100.0)
  assert signature.startswith("nrefs:1|") and "|nc:6|" in signature


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


# The config keys `evaluate.evaluate` reads.
FAKE_CONFIG = types.SimpleNamespace(eval=types.SimpleNamespace(batch_size=2),
                                    model=types.SimpleNamespace(max_len=5))


def test_evaluate_keeps_the_hypotheses_in_the_splits_order_and_limits_both_passes(monkeypatch):
  """The pipeline (tested in tests/data/test_pipeline.py) is given max_examples; the batches
  come out of example order, the hypotheses in it; chrF is over the same pairs as BLEU."""
  batches = [{"inputs": np.array([[6, 4], [4, 0]]), "example_ids": np.array([2, 0])},
             {"inputs": np.array([[5, 5], [0, 0]]), "example_ids": np.array([1, -1])}]
  references = [("s0", "a"), ("s1", "bb"), ("s2", "ca")]
  asked = {}

  def make_eval_batches(config, tokenizer, data_dir, split, *, batch_size, max_examples):
    asked["batches"] = max_examples
    return iter(batches)

  def eval_references(config, data_dir, split, max_examples):
    asked["references"] = max_examples
    return references

  monkeypatch.setattr(evaluate.pipeline, "make_eval_batches", make_eval_batches)
  monkeypatch.setattr(evaluate.pipeline, "eval_references", eval_references)
  seen = []

  def eval_step(batch):
    seen.append(batch["example_ids"].tolist())
    return {"loss": 1.0, "nll": 1.0, "correct": 1.0, "num_tokens": 2.0}

  metrics = evaluate.evaluate(
      FAKE_CONFIG, tokenizer=LettersTokenizer(), data_dir="d", split="test", eval_step=eval_step,
      translate_fn=lambda inputs: inputs, max_examples=3, keep_hypotheses=True)
  assert asked == {"batches": 3, "references": 3}
  assert seen == [[2, 0], [1, -1]]  # Both batches teacher-forced, then both decoded.
  assert metrics["hypotheses"] == ["a", "bb", "ca"]  # Examples 0, 1, 2.
  assert metrics["examples"] == metrics["decoded_examples"] == 3
  assert metrics["exact_match"] == 1.0
  assert metrics["chrf"] == pytest.approx(100.0)
  assert metrics["chrf_signature"] == evaluate.chrf(["a"], ["a"])[1]
  without = evaluate.evaluate(FAKE_CONFIG, tokenizer=LettersTokenizer(), data_dir="d",
                              split="test", eval_step=eval_step, translate_fn=lambda x: x)
  assert "hypotheses" not in without and asked == {"batches": None, "references": None}


class StopAfter:
  """should_stop that says yes from its `n`-th question on; counts the questions."""

  def __init__(self, n):
    self.n, self.asked = n, 0

  def __call__(self):
    self.asked += 1
    return self.asked > self.n


def test_a_stop_request_ends_either_pass_before_the_next_batch():
  batches = [{"inputs": np.array([[4, 5]]), "example_ids": np.array([i])} for i in range(5)]
  done = []

  def eval_step(batch):
    done.append(int(batch["example_ids"][0]))
    return {"loss": 1.0, "nll": 1.0, "correct": 1.0, "num_tokens": 2.0}

  with pytest.raises(evaluate.EvaluationStopped) as stopped:
    evaluate.teacher_forced_metrics(eval_step, batches, StopAfter(2), "validation")
  assert done == [0, 1]  # Asked before every batch, and the third was never started.
  assert str(stopped.value) == ("the evaluation of validation stopped after 2 of 5 "
                                "teacher-forced batches")

  decoded = []

  def translate_fn(inputs):
    decoded.append(inputs)
    return inputs

  with pytest.raises(evaluate.EvaluationStopped, match="after 3 of 5 decoding batches"):
    evaluate.translate_batches(translate_fn, LettersTokenizer(), batches, 4, StopAfter(3))
  assert len(decoded) == 3
  # Never asked to stop (should_stop None, or always False): every batch, every metric.
  assert len(evaluate.translate_batches(translate_fn, LettersTokenizer(), batches, 4,
                                        lambda: False)) == 5
  assert evaluate.stop_agreed(None) is False and evaluate.stop_agreed(lambda: 1) is True


# One process of a pod of two: process 0 is asked to stop before its third batch, process 1
# never is. Prints how many batches it decoded and how the evaluation ended.
POD_PROCESS = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    port, index = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index,
                               initialization_timeout=60)
    from jaxformer import evaluate
    asked, decoded = [], []
    def should_stop():
      asked.append(1)
      return index == 0 and len(asked) > 2
    def translate_fn(inputs):
      decoded.append(1)
      return inputs
    class Tokenizer:
      def decode(self, ids):
        return str(ids)
    batches = [{"inputs": np.array([[4, 5]]), "example_ids": np.array([2 * i + index])}
               for i in range(6)]
    try:
      evaluate.translate_batches(translate_fn, Tokenizer(), batches, 4, should_stop)
      print(f"finished after {len(decoded)}", flush=True)
    except evaluate.EvaluationStopped as e:
      print(f"stopped after {len(decoded)}: {e}", flush=True)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_every_process_stops_at_the_batch_where_any_process_was_asked_to():
  """A process that stopped alone would leave the other waiting in the final gather."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  processes = [subprocess.Popen([sys.executable, "-c", POD_PROCESS, str(port), str(index)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for index in (0, 1)]
  try:
    outputs = [p.communicate(timeout=60) for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
    ends = [line for line in out.splitlines() if line.startswith(("stopped", "finished"))]
    assert ends == ["stopped after 2: the evaluation of the split stopped after 2 of 6 decoding "
                    "batches"], out + err[-3000:]
