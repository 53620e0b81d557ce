"""The StableHLO export (jaxformer.interop.stablehlo), written by `jaxformer export` from a tiny
run (random parameters, max_len 16: the buckets 8 and 16), and read back by
docs/stablehlo_translate.py in a process that cannot import jaxformer, where it must give exactly
the live beam search's hypotheses."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jaxformer import cli, decode, inference
from jaxformer.interop import stablehlo
from jaxformer.model.transformer import Transformer

from tests import tiny_run_testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "docs", "stablehlo_translate.py")
BEAM = 4
# Three lines of the 8-wide bucket, two of the 16-wide one, and an empty line.
LINES = ["one", "twenty-one", "three hundred twenty-one", "", "twenty-one three hundred one",
         "seven hundred seventy-seven forty-two"]

# What the fresh process runs. jaxformer is installed (editable) in this environment whatever
# PYTHONPATH says, so a finder that refuses it makes any import of it by the script fail, and
# the jaxformer modules loaded all the same are reported.
LOADER = """
import importlib.util, json, sys

class NoJaxformer:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] == "jaxformer":
      raise ImportError(f"{name}: the exported directory must be usable without jaxformer")

sys.meta_path.insert(0, NoJaxformer())
import numpy as np
request = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("stablehlo_translate", request["script"])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
model = script.load(request["directory"])
searched = {width: [x.tolist() for x in script.beam_search(model, np.array(rows, np.int32))]
            for width, rows in request["batches"].items()}
print(json.dumps({"searched": searched, "translations": script.translate(model, request["lines"]),
                  "jaxformer_modules": [m for m in sys.modules if m.startswith("jaxformer")]}))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run as training leaves it, decoding with beam 4; (workdir, live InferenceRun)."""
  config = tiny_run_testing.tiny_config(num_layers=1).as_configdict()
  config.decode.beam_size = BEAM
  config = ml_collections.FrozenConfigDict(config)
  path = str(tmp_path_factory.mktemp("stablehlo") / "run")
  tokenizer = tiny_run_testing.number_tokenizer()
  params = jax.device_get(tiny_run_testing.make_run(path, config, tokenizer))
  return path, inference.InferenceRun(Transformer(config=config.model), params, config,
                                      tokenizer, tiny_run_testing.STEP)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("stablehlo") / "exported")
  assert cli.main(["export", "--workdir", workdir[0], "--format", "stablehlo", "--out", out]) == 0
  return out


def test_export_writes_the_programs_parameters_vocabulary_and_manifest(workdir, exported):
  run = workdir[1]
  with open(os.path.join(exported, stablehlo.MANIFEST)) as f:
    manifest = json.load(f)
  widths = [bucket["width"] for bucket in manifest["buckets"]]
  assert widths == [8, 16] == decode.length_buckets(run.config.model.max_len)
  assert sorted(os.listdir(exported)) == sorted(
      [stablehlo.MANIFEST, stablehlo.PARAMS, stablehlo.VOCAB] +
      [stablehlo.program_file(w) for w in widths])
  assert (manifest["beam_size"], manifest["alpha"], manifest["step"]) == (
      BEAM, run.config.decode.alpha, tiny_run_testing.STEP)
  live = stablehlo.flat_params(run.params)
  with np.load(os.path.join(exported, stablehlo.PARAMS)) as saved:
    assert sorted(saved.files) == sorted(live)
    for name, value in live.items():
      np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_an_out_that_is_not_empty_is_exit_2_and_left_untouched(workdir, tmp_path, capsys):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  args = ["export", "--workdir", workdir[0], "--format", "stablehlo", "--out", str(out)]
  assert cli.main(args) == 2
  assert "already exists and is not an empty directory" in capsys.readouterr().err
  assert os.listdir(tmp_path) == ["taken"] and os.listdir(out) == ["notes.txt"]
  assert (out / "notes.txt").read_text() == "mine"


def live_batches(run) -> tuple[dict[int, np.ndarray], list[tuple[int, int] | None]]:
  """LINES as translate pads them: {width: ids [B, width]}, and where each line went, (width,
  row), or None for the empty line (not decoded)."""
  max_len, batches, where = run.config.model.max_len, {}, []
  for number, line in enumerate(LINES, start=1):
    ids, _ = inference.encode_line(run.tokenizer, line, max_len, f"LINES:{number}")
    if not ids:
      where.append(None)
      continue
    width = decode.power_of_two(len(ids), decode.MIN_LENGTH_BUCKET, max_len)
    rows = batches.setdefault(width, [])
    where.append((width, len(rows)))
    rows.append(ids + [0] * (width - len(ids)))
  return {width: np.array(rows, np.int32) for width, rows in batches.items()}, where


def without_jaxformer(request: dict, cwd) -> subprocess.Popen:
  """LOADER started on `request`, in a process whose PYTHONPATH does not hold the repository
  (it runs while this process decodes live)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.Popen([sys.executable, "-c", LOADER, json.dumps(request)], cwd=cwd, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def answer_of(process: subprocess.Popen) -> dict:
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  return json.loads(stdout)


def test_the_export_gives_the_live_beam_search_without_jaxformer(workdir, exported, tmp_path):
  """Two buckets, batch sizes 3 and 2 (the programs were exported for a symbolic batch)."""
  run = workdir[1]
  batches, where = live_batches(run)
  assert {w: len(b) for w, b in batches.items()} == {8: 3, 16: 2}
  loader = without_jaxformer({"script": SCRIPT, "directory": exported, "lines": LINES,
                              "batches": {w: b.tolist() for w, b in batches.items()}}, tmp_path)
  d = run.config.decode
  try:
    live = {width: decode.decode_batch(run.model, run.params, inputs, beam_size=BEAM,
                                       alpha=d.alpha, max_extra_len=d.max_extra_len)
            for width, inputs in batches.items()}
  finally:
    answer = answer_of(loader)
  assert answer["jaxformer_modules"] == []
  for width, result in live.items():
    tokens, scores, lengths = (np.array(x) for x in answer["searched"][str(width)])
    np.testing.assert_array_equal(tokens, result.tokens)
    np.testing.assert_array_equal(lengths, result.lengths)
    np.testing.assert_allclose(scores, result.scores, rtol=1e-6)

  def best_text(width, row):
    return run.tokenizer.decode(live[width].tokens[row, 0, :live[width].lengths[row, 0]])
  assert answer["translations"] == [best_text(*place) if place else "" for place in where]


@pytest.mark.parametrize("max_len, widths", [(256, [8, 16, 32, 64, 128, 256]), (24, [8, 16, 24]),
                                             (5, [5])])
def test_one_program_per_width_translate_pads_to(max_len, widths):
  assert decode.length_buckets(max_len) == widths
