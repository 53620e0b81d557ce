"""`jaxformer export --format hf` and `jaxformer import --format hf` (jaxformer.interop.marian):
HF's MarianMTModel computes jaxformer's logits and greedy translations from an export, an
imported MarianMTModel computes HF's logits in jaxformer, jaxformer -> HF -> jaxformer gives the
parameters back bit for bit, and what cannot be converted is one line naming the setting.

Models are tiny with random weights (no training), written straight into workdirs; the commands
run in this process (`jaxformer.cli.main`).
"""

import functools
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxformer import checkpoint, cli, decode, inference
from jaxformer import workdir as workdir_lib
from jaxformer.interop import marian
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID

from tests import tiny_run_testing
from tests.model import model_testing

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

EPSILON = marian.HF_LAYER_NORM_EPSILON  # jaxformer's models take HF's, so the numbers match.
# The two exported models: between them every tensor layout and option of the table.
EXPORTED = {
    "biases_tied": dict(activation="gelu", final_logits_bias=True),
    "unshared_untied_no_biases_scanned": dict(
        attention_bias=False, share_embeddings=False, tie_output=False, scan_layers=True),
}
SOURCES = ["three hundred twenty one", "seven", "nine thousand and five"]
RELATIVE = 1e-5


def assert_close(got, want):
  """|got - want| <= RELATIVE * max |want|, element by element."""
  np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE * np.abs(want).max())


def padded(rows):
  """Rows of ids -> [B, L] int32, PAD after each row."""
  out = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def write_workdir(workdir, config, tokenizer, params, step=1):
  """A workdir as inference reads it: config.json, vocab.model, checkpoints/<step> (params)."""
  os.makedirs(workdir)
  tokenizer.save(os.path.join(workdir, workdir_lib.VOCAB_FILE))
  workdir_lib.write_run_config(workdir, config)
  checkpoint.save_params(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR, str(step)),
                         params, {})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{name: (jaxformer workdir, its params (host), its export)} for each of EXPORTED."""
  root = tmp_path_factory.mktemp("export")
  tokenizer = tiny_run_testing.number_tokenizer()
  runs = {}
  for name, settings in EXPORTED.items():
    config = tiny_run_testing.tiny_config(layer_norm_epsilon=EPSILON, max_len=32, **settings)
    params = jax.device_get(model_testing.random_params(config.model, seed=len(runs)))
    workdir, out = str(root / name), str(root / f"{name}_hf")
    write_workdir(workdir, config, tokenizer, params)
    assert cli.main(["export", "--workdir", workdir, "--format", "hf", "--out", out]) == 0
    runs[name] = workdir, params, out
  return runs


def hf_logits(model, inputs, decoder_inputs):
  with torch.no_grad():
    return model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != PAD_ID),
                 decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def jax_run(workdir):
  return inference.load_for_inference(workdir, sharding=inference.inference_sharding())


@functools.lru_cache
def compiled_apply(model):
  """`model.apply`, compiled once per model (a dozen times quicker than op by op here)."""
  return jax.jit(model.apply)


def jax_logits(run, inputs, targets):
  return np.asarray(compiled_apply(run.model)({"params": run.params}, inputs, targets))


def shifted(targets):
  """Decoder inputs as jaxformer makes them: BOS, then the targets but the last."""
  return np.concatenate([np.full((len(targets), 1), BOS_ID), targets[:, :-1]], axis=1)


@pytest.mark.parametrize("name", EXPORTED)
def test_marian_computes_jaxformer_s_logits(exported, name):
  workdir, _, out = exported[name]
  run = jax_run(workdir)
  model = transformers.MarianMTModel.from_pretrained(out).eval()
  inputs = padded([run.tokenizer.encode(s) + [EOS_ID] for s in SOURCES])
  targets = padded([run.tokenizer.encode(s) + [EOS_ID] for s in ("uno", "tres mil", "dos")])
  real = targets != PAD_ID  # Padded positions compute nothing that is used.
  assert_close(hf_logits(model, inputs, shifted(targets))[real],
               jax_logits(run, inputs, targets)[real])


def test_marian_generate_gives_jaxformer_s_greedy_tokens(exported):
  workdir, _, out = exported["biases_tied"]
  run = jax_run(workdir)
  model = transformers.MarianMTModel.from_pretrained(out).eval()
  inputs = padded([run.tokenizer.encode(s) + [EOS_ID] for s in SOURCES])
  greedy = decode.decode_batch(run.model, run.params, inputs, beam_size=1, alpha=0.0,
                               max_extra_len=run.config.decode.max_extra_len)
  lengths = np.asarray(greedy.lengths[:, 0])
  with torch.no_grad():  # generation_config.json: from BOS, with PAD and BOS banned.
    generated = model.generate(torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                               num_beams=1, do_sample=False,
                               max_new_tokens=int(lengths.max())).numpy()
  assert (generated[:, 0] == BOS_ID).all()
  for row, length in enumerate(lengths):
    np.testing.assert_array_equal(generated[row, 1:1 + length],
                                  np.asarray(greedy.tokens[row, 0, :length]))


def test_marian_tokenizer_gives_jaxformer_s_ids(exported):
  workdir, _, out = exported["biases_tied"]
  tokenizer = transformers.MarianTokenizer.from_pretrained(out)
  ours = jax_run(workdir).tokenizer
  for text in SOURCES + ["cuatrocientos veintiuno"]:
    assert tokenizer(text).input_ids == ours.encode(text) + [EOS_ID]
    assert tokenizer(text_target=text).input_ids == ours.encode_target(text) + [EOS_ID]


@pytest.mark.parametrize("name", EXPORTED)
def test_jaxformer_to_hf_to_jaxformer_gives_the_parameters_back_exactly(exported, name,
                                                                        tmp_path):
  workdir, params, out = exported[name]
  back = str(tmp_path / "back")
  assert cli.main(["import", "--format", "hf", "--from", out, "--workdir", back]) == 0
  original, imported = workdir_lib.read_run_config(workdir), workdir_lib.read_run_config(back)
  # The import writes unrolled layers; every other model setting comes back as it was.
  assert (dict(imported.model, scan_layers=False)
          == dict(original.model, scan_layers=False))
  got = checkpoint.restore_params(*checkpoint.checkpoint_dir(back, 0), back)
  want = marian.unrolled(params, original.model)
  assert checkpoint.flat_shapes(got) == checkpoint.flat_shapes(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert jax_run(back).tokenizer.encode(SOURCES[0]) == jax_run(workdir).tokenizer.encode(
      SOURCES[0])


# --- Import of a MarianMTModel built here. ----------------------------------------------------

ENGLISH = "the a small green old house tree river stone light night day bird sun".split()
GERMAN = "das ein klein grün alt haus baum fluss stein licht nacht tag vogel sonne".split()


def sentencepiece_model(words, seed):
  """A tiny SentencePiece model (bytes) trained on a few hundred sentences of `words`."""
  import sentencepiece as spm
  rng = np.random.RandomState(seed)
  sentences = [" ".join(rng.choice(words, rng.randint(1, 8))) for _ in range(300)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                 vocab_size=60, hard_vocab_limit=False, minloglevel=2)
  return model.getvalue()


def pieces_of(model):
  import sentencepiece as spm
  processor = spm.SentencePieceProcessor(model_proto=model)
  return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


@pytest.fixture(scope="module")
def opus(tmp_path_factory):
  """(the directory of a MarianMTModel as Opus-MT lays it out: swish, a final logits bias,
  </s> 0, <unk> 1, <pad> last and the decoder start; the model; its imported workdir)."""
  root = tmp_path_factory.mktemp("opus")
  directory = str(root / "hf")
  os.makedirs(directory)
  models = [sentencepiece_model(ENGLISH, 0), sentencepiece_model(GERMAN, 1)]
  for name, model in zip((marian.SOURCE_SPM, marian.TARGET_SPM), models):
    with open(os.path.join(directory, name), "wb") as f:
      f.write(model)
  shared = sorted(set(pieces_of(models[0]) + pieces_of(models[1])) - {"<unk>", "<s>", "</s>"})
  pieces = ["</s>", "<unk>"] + shared + ["<pad>"]
  with open(os.path.join(directory, marian.VOCAB_JSON), "w") as f:
    json.dump({piece: i for i, piece in enumerate(pieces)}, f)
  size = len(pieces)
  config = transformers.MarianConfig(
      vocab_size=size, decoder_vocab_size=size, d_model=32, encoder_layers=2, decoder_layers=2,
      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
      decoder_ffn_dim=48, max_position_embeddings=32, activation_function="swish",
      scale_embedding=True, pad_token_id=size - 1, eos_token_id=0,
      decoder_start_token_id=size - 1, forced_eos_token_id=0)
  torch.manual_seed(0)
  model = transformers.MarianMTModel(config).eval()
  with torch.no_grad():  # Random weights of a useful scale; the sinusoid table stays.
    for name, weight in model.named_parameters():
      if "embed_positions" not in name:
        weight.normal_(0.0, 0.3)
    model.final_logits_bias.normal_(0.0, 1.0)
  model.save_pretrained(directory)
  workdir = str(root / "imported")
  assert cli.main(["import", "--format", "hf", "--from", directory, "--workdir", workdir]) == 0
  return directory, model, workdir


def to_our_ids(run, directory):
  """[V_hf] array: HF id -> the imported workdir's id, through the pieces of vocab.json."""
  with open(os.path.join(directory, marian.VOCAB_JSON)) as f:
    hf_ids = json.load(f)
  ours = {run.tokenizer.id_to_piece(i): i for i in range(run.tokenizer.vocab_size)}
  return np.asarray([ours[piece] for piece in sorted(hf_ids, key=hf_ids.get)])


def test_an_imported_marian_model_computes_hf_s_logits(opus):
  directory, model, workdir = opus
  run = jax_run(workdir)
  assert run.config.model.activation == "swish" and run.config.model.final_logits_bias
  assert run.config.model.sinusoid_layout == "half"
  tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
  to_ours = to_our_ids(run, directory)
  sources, targets = ["the small green house", "day"], ["das alt haus baum", "vogel"]
  batch = tokenizer(sources, text_target=targets, padding=True, return_tensors="np")
  # jaxformer's tokenizer: sources by source.spm, targets by target.spm, HF's ids remapped.
  inputs = padded([run.tokenizer.encode(s) + [EOS_ID] for s in sources])
  labels = padded([run.tokenizer.encode_target(t) + [EOS_ID] for t in targets])
  np.testing.assert_array_equal(to_ours[batch.input_ids], inputs)
  np.testing.assert_array_equal(to_ours[batch.labels], labels)
  with torch.no_grad():
    hf = model(input_ids=torch.tensor(batch.input_ids),
               attention_mask=torch.tensor(batch.attention_mask),
               labels=torch.tensor(batch.labels)).logits.numpy()
  logits = jax_logits(run, inputs, labels)
  real = labels != PAD_ID
  assert_close(logits[real][:, to_ours], hf[real])
  # The added BOS row takes no probability: the softmax is Marian's.
  log_probs = jax.nn.log_softmax(logits[real])
  assert_close(np.asarray(log_probs)[:, to_ours], np.asarray(jax.nn.log_softmax(hf[real])))


def test_translate_runs_on_an_imported_model_and_gives_hf_s_greedy_output(opus, tmp_path,
                                                                        capsys):
  directory, model, workdir = opus
  lines = ["the small green house", "night day"]
  source, output = tmp_path / "in.txt", tmp_path / "out.txt"
  source.write_text("\n".join(lines) + "\n")
  assert cli.main(["translate", "--workdir", workdir, "--input", str(source), "--output",
                   str(output), "--beam-size", "1"]) == 0
  run = jax_run(workdir)
  tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
  batch = tokenizer(lines, padding=True, return_tensors="pt")
  with torch.no_grad():
    generated = model.generate(**batch, num_beams=1, do_sample=False, forced_eos_token_id=None,
                               bad_words_ids=[[model.config.pad_token_id]],
                               max_length=run.config.model.max_len + 1).numpy()
  to_ours = to_our_ids(run, directory)
  ours = [run.tokenizer.decode(to_ours[row[1:]]) for row in generated]
  assert output.read_text().splitlines() == ours


def test_an_imported_model_exports_again(opus, tmp_path):
  directory, model, workdir = opus
  out = str(tmp_path / "again")
  assert cli.main(["export", "--workdir", workdir, "--format", "hf", "--out", out]) == 0
  with open(os.path.join(out, marian.CONFIG_FILE)) as f:
    assert json.load(f)[marian.SINUSOID_LAYOUT_KEY] == "half"  # Marian's: nothing to permute.
  again = transformers.MarianMTModel.from_pretrained(out).eval()
  to_ours = to_our_ids(jax_run(workdir), directory)
  inputs, labels = np.asarray([[5, 6, 7, 0]]), np.asarray([[8, 9, 10, 0]])  # Marian's ids.
  with torch.no_grad():
    original = model(input_ids=torch.tensor(inputs), labels=torch.tensor(labels)).logits.numpy()
  # The export has jaxformer's ids (and the BOS row): the same numbers, reordered.
  assert_close(hf_logits(again, to_ours[inputs], shifted(to_ours[labels]))[..., to_ours],
               original)


# --- What cannot be converted: one line, exit 2, nothing written. ----------------------------

def one_error_line(capsys, status, *fragments):
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert status == 2, captured.err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("settings,fragment", [
    (dict(norm="pre"), "model.norm='pre'"),
    (dict(pos_encoding="learned"), "model.pos_encoding='learned'"),
])
def test_export_of_what_marian_cannot_express_names_the_setting(settings, fragment, tmp_path,
                                                                capsys):
  config = tiny_run_testing.tiny_config(**settings)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  write_workdir(workdir, config, tiny_run_testing.number_tokenizer(),
                jax.device_get(model_testing.random_params(config.model)))
  status = cli.main(["export", "--workdir", workdir, "--format", "hf", "--out", out])
  one_error_line(capsys, status, fragment, "--format hf")
  assert not os.path.exists(out) and os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("change,fragment", [
    (dict(normalize_before=True), "normalize_before=True"),
    (dict(encoder_layers=3), "encoder_layers=3 but decoder_layers=2"),
    (dict(activation_function="gelu"), "activation_function='gelu'"),
    (dict(scale_embedding=False), "scale_embedding=False"),
])
def test_import_of_a_config_jaxformer_cannot_express_names_the_field(opus, change, fragment,
                                                                     tmp_path, capsys):
  directory = str(tmp_path / "hf")
  shutil.copytree(opus[0], directory)
  with open(os.path.join(directory, marian.CONFIG_FILE)) as f:
    config = json.load(f)
  with open(os.path.join(directory, marian.CONFIG_FILE), "w") as f:
    json.dump({**config, **change}, f)
  workdir = str(tmp_path / "imported")
  status = cli.main(["import", "--format", "hf", "--from", directory, "--workdir", workdir])
  one_error_line(capsys, status, fragment, marian.CONFIG_FILE)
  assert not os.path.exists(workdir)


def test_import_from_a_missing_directory_is_one_line(tmp_path, capsys):
  status = cli.main(["import", "--format", "hf", "--from", str(tmp_path / "nowhere"),
                     "--workdir", str(tmp_path / "imported")])
  one_error_line(capsys, status, "nowhere", "is not a directory")
  assert os.listdir(tmp_path) == []


def test_stablehlo_export_of_an_imported_run_is_refused_in_one_line(opus, tmp_path, capsys):
  out = str(tmp_path / "shlo")
  status = cli.main(["export", "--workdir", opus[2], "--format", "stablehlo", "--out", out])
  one_error_line(capsys, status, "two vocabularies", "--format ctranslate2")
  assert os.listdir(tmp_path) == []  # Not even the scratch directory is left.
