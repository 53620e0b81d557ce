"""Handing a trained run to the rest of the field, and taking models from it.

One module a format, each with the same two-sided contract (jaxformer.inference loads the run,
checks the destination and makes the write all-or-nothing; these modules only convert):

- `marian`: Hugging Face MarianMT (`transformers.MarianMTModel`), export and import;
- `ct2`: a CTranslate2 model directory, through CTranslate2's own spec API;
- `stablehlo`: the beam search as a serialised `jax.export` program with its parameters.

`export(run, out, quantize)` writes the format into the (new, empty) directory `out`; `run` is a
`jaxformer.inference.InferenceRun` with its parameters on the host. `import_model(source, out)`
(marian only) writes a jaxformer workdir into `out`. The libraries of a format (transformers,
ctranslate2, ...) are imported inside these functions: they are the optional `interop` extra.
"""

# `jaxformer export --format F` -> the module of jaxformer.interop that writes F.
EXPORT_MODULES = {"hf": "marian", "ctranslate2": "ct2", "stablehlo": "stablehlo"}
IMPORT_MODULES = {"hf": "marian"}
# Weight types `--quantize` offers, by format.
QUANTIZATIONS = {"ctranslate2": ("int8",)}


def require(library: str, fmt: str):
  """Imports an optional library of the `interop` extra, or says in one line how to get it."""
  import importlib
  try:
    return importlib.import_module(library)
  except ImportError:
    from jaxformer.errors import InputError
    raise InputError(f"--format {fmt} needs {library}, which is not installed; install the "
                     "interop extra: pip install -e '.[interop]' (README, \"Fine-tuning, import "
                     "and export\")") from None
