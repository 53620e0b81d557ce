"""`jaxformer export --format ctranslate2`: CTranslate2 computes what jaxformer computes.

- On random parameters (no training), for each kind of model setting: CTranslate2's per-token
  log-probabilities of given targets equal jaxformer's to 1e-4, and its greedy search outputs
  jaxformer's greedy tokens.
- On a trained run of the default experiment: `jaxformer.interop.ct2.translate` (CTranslate2,
  float32, beam 4) gives jaxformer's own beam-4 translations of the test split for at least 99%
  of the sentences, and the int8 model is within 1 BLEU of float32.
- A setting CTranslate2 cannot express is one error line with status 2, and nothing is
  written.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest
import sacrebleu

from jaxformer import cli, decode, inference
from jaxformer.data import sources
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID
from jaxformer.train import state as state_lib
from tests import run_testing, tiny_run_testing

ctranslate2 = pytest.importorskip("ctranslate2")
sentencepiece = pytest.importorskip("sentencepiece")
from jaxformer.interop import ct2  # noqa: E402  (after the skip: it is the interop extra's)

# The default experiment shrunk (run_testing.TINY) but wider, trained long enough to be sure of
# its outputs: beam searches then agree for a reason, not by luck (~40 BLEU on the test split).
TRAINED = {"model.d_model": 64, "model.d_ff": 128, "model.num_heads": 4,
           "train.batch_size": 16, "train.steps": 300, "train.log_every_steps": 100,
           "train.eval_every_steps": 300, "checkpoint.every_steps": 300}
BEAM_SIZE = 4
AGREEMENT = 0.99
INT8_BLEU_LOSS = 1.0
LEARNED_BLEU = 20.0  # below this the model has not learnt the task: agreement would say little.
TEXTS = ["three hundred twenty one", "seven", "one hundred one", "ninety nine thousand"]
# Every setting the export maps, in three models: the paper's (post-LN, interleaved sinusoids,
# shared and tied embeddings, attention biases, relu); the alternatives of each, with the
# scanned parameter layout and embedding rows past the vocabulary's pieces; and Marian's.
SETTINGS = {
    "paper": dict(max_len=32),
    "alternatives": dict(max_len=32, norm="pre", pos_encoding="learned", activation="gelu",
                         share_embeddings=False, tie_output=False, attention_bias=False,
                         scan_layers=True, vocab_size=60),
    "marian": dict(max_len=32, activation="swish", sinusoid_layout="half",
                   final_logits_bias=True, layer_norm_epsilon=1e-5),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(runs):
  return runs.trained_once("ctranslate2", TRAINED)


def export(workdir, out, *extra):
  """`jaxformer export ... --format ctranslate2` in this process: its exit status."""
  return cli.main(["export", "--workdir", workdir, "--format", "ctranslate2", "--out", str(out),
                   *extra])


def ct2_translate(model_dir, lines, compute_type="default"):
  """The lines translated as the module docstring of jaxformer.interop.ct2 shows a user."""
  with open(os.path.join(model_dir, ct2.SETTINGS_FILE)) as f:
    settings = json.load(f)
  translator = ctranslate2.Translator(str(model_dir), compute_type=compute_type)
  source, target = (sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(model_dir, f"{side}.spm")) for side in ("source", "target"))
  return ct2.translate(translator, source, target, lines, **settings)


# --- Exact on random parameters. ---------------------------------------------------------------

def random_run(**model):
  """An InferenceRun of a tiny model with random parameters, moved off their initial values
  (zero biases, unit LayerNorm scales) so that every weight matters."""
  config = tiny_run_testing.tiny_config(**model)
  params = jax.device_get(jax.jit(functools.partial(state_lib.init_params, config))(
      jax.random.key(1)))  # Compiled: quicker than op by op.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  tokenizer = tiny_run_testing.number_tokenizer()
  return inference.InferenceRun(Transformer(config.model), params, config, tokenizer, 0)


def padded(rows):
  """Token id lists -> `[B, L]` int32, PAD after each."""
  ids = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  return ids


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_ctranslate2_greedy_tokens_and_their_scores_are_jaxformers(tmp_path, settings):
  run = random_run(**settings)
  ct2.export(run, str(tmp_path), None)
  translator = ctranslate2.Translator(str(tmp_path))
  vocabulary = ct2.vocabulary(run.tokenizer, run.config.model.vocab_size)
  sources_ = [run.tokenizer.encode(t) + [EOS_ID] for t in TEXTS]
  pieces = [[vocabulary[i] for i in ids[:-1]] for ids in sources_]  # CTranslate2 adds EOS.
  max_extra_len = run.config.decode.max_extra_len
  greedy = [translator.translate_batch(
      [p], beam_size=1, min_decoding_length=0, return_end_token=True,
      max_decoding_length=min(len(ids) + max_extra_len, run.config.model.max_len),
      suppress_sequences=[[vocabulary[PAD_ID]], [vocabulary[BOS_ID]]])[0].hypotheses[0]
      for p, ids in zip(pieces, sources_)]
  targets = [[vocabulary.index(p) for p in hypothesis] for hypothesis in greedy]
  scored = translator.score_batch(pieces, [[p for p in h if p != vocabulary[EOS_ID]]
                                           for h in greedy])

  # jaxformer's log-probabilities of CTranslate2's outputs, all positions at once.
  logits = run.model.apply({"params": run.params}, padded(sources_), padded(targets))
  log_probs = np.array(jax.nn.log_softmax(logits, axis=-1))  # [B, T, V]
  log_probs[:, :, list(decode.NEVER_GENERATED)] = -np.inf
  for b, target in enumerate(targets):
    # Greedy search's tokens: jaxformer's most likely token at every step.
    assert np.argmax(log_probs[b, :len(target)], axis=-1).tolist() == target
    # score_batch appends EOS unless the greedy output was cut at the length limit without it.
    ours = log_probs[b, np.arange(len(target)), target]
    np.testing.assert_allclose(scored[b].log_probs[:len(target)], ours, atol=1e-4)


# --- A trained run: beam search and int8. ------------------------------------------------------

def test_ctranslate2_beam_search_translates_the_test_split_as_jaxformer_and_int8_keeps_bleu(
    trained, tmp_path):
  assert export(trained, tmp_path / "float32") == 0
  run = inference.load_for_inference(trained, sharding=inference.inference_sharding())
  os.makedirs(tmp_path / "int8")
  ct2.export(run._replace(params=jax.device_get(run.params)), str(tmp_path / "int8"), "int8")
  d = run.config.decode
  assert d.beam_size == BEAM_SIZE
  split = sources.get_split(run.config, "test", run.config.data.data_dir)
  lines, references = zip(*((p["source"], p["target"]) for p in split))

  # jaxformer's beam search, all the sentences in one batch.
  ids = padded([run.tokenizer.encode(line) + [EOS_ID] for line in lines])
  best = decode.decode_batch(run.model, run.params, ids, beam_size=d.beam_size, alpha=d.alpha,
                             max_extra_len=d.max_extra_len)
  ours = [run.tokenizer.decode(np.asarray(row[0]).tolist()) for row in best.tokens]
  float32 = ct2_translate(tmp_path / "float32", lines)
  int8 = ct2_translate(tmp_path / "int8", lines, compute_type="int8")

  assert len(ours) == len(float32) == len(lines) == run.config.data.num_test
  bleu = {name: sacrebleu.corpus_bleu(list(hyps), [list(references)]).score
          for name, hyps in (("jaxformer", ours), ("float32", float32), ("int8", int8))}
  assert bleu["jaxformer"] > LEARNED_BLEU, bleu
  agreement = np.mean([a == b for a, b in zip(ours, float32)])
  assert agreement >= AGREEMENT, [(a, b) for a, b in zip(ours, float32) if a != b]
  assert bleu["int8"] >= bleu["float32"] - INT8_BLEU_LOSS, bleu
  # The int8 model really holds int8 weights (or the comparison would prove nothing).
  sizes = {name: os.path.getsize(tmp_path / name / "model.bin") for name in ("float32", "int8")}
  assert sizes["int8"] < 0.5 * sizes["float32"], sizes


# --- Bad input. --------------------------------------------------------------------------------

def test_a_setting_ctranslate2_cannot_express_is_named_and_nothing_is_written(
    trained, tmp_path, capsys, monkeypatch):
  # Every setting jaxformer has maps exactly; a newer one that CTranslate2 lacks is simulated by
  # taking the run's activation out of the export's table.
  monkeypatch.delitem(ct2.ACTIVATIONS, "relu")
  out = tmp_path / "out"
  assert export(trained, out) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: model.activation='relu' has no "
                                                 "CTranslate2 counterpart"), lines
  assert not out.exists() and os.listdir(tmp_path) == []
