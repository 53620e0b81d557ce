"""The house itself: one job per file, every import pointing down, private APIs in one room.

These read the source (with `ast`) or import it in a fresh interpreter; they run no model.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxformer"

# The rooms of the house, top to bottom (../shared/DESIGN.md, "Layout"): a module may import
# only rooms below its own. Modules of one package (train/, model/, data/) import each other.
ROOMS = ("__main__", "cli", "launcher", "train", "inference", "interop", "plots",
         "attention_maps", "evaluate", "decode", "checkpoint", "objective", "model", "data",
         "devices", "workdir", "config", "log", "tokens", "errors")
# Where a private API of jax or grain may be used, and where global hooks are installed.
INTERNALS = "jaxformer/train/jax_internals.py"
MAX_FUNCTION_LINES = 60
# Names with a leading underscore that are public APIs all the same.
PUBLIC_UNDERSCORE = ("_exit", "_replace", "_asdict", "_fields", "_make")


def modules(root: pathlib.Path = PACKAGE) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def room(path_or_module: str) -> str:
  """'jaxformer/train/loop.py' or 'jaxformer.train.loop' -> 'train'."""
  parts = str(path_or_module).replace(os.sep, ".").removesuffix(".py").split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def jaxformer_imports(path: pathlib.Path) -> set[str]:
  """Every jaxformer module `path` imports, at the top or inside a function: 'jaxformer.x.y'."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("jaxformer")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxformer"):
      if node.module == "jaxformer":  # `from jaxformer import checkpoint, workdir`
        found |= {f"jaxformer.{a.name}" for a in node.names}
      else:
        found.add(node.module)
  return found


def relative(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def test_every_module_stands_in_a_room():
  rooms = {room(relative(p)) for p in modules()} - {"__init__"}
  assert rooms <= set(ROOMS), f"modules outside the layout: {sorted(rooms - set(ROOMS))}"


def test_every_import_points_down():
  upward = []
  for path in modules():
    own = room(relative(path))
    if own == "__init__":
      continue
    for imported in jaxformer_imports(path):
      target = room(imported)
      if target != own and ROOMS.index(target) < ROOMS.index(own):
        upward.append(f"{relative(path)} imports {imported}")
  assert not upward, "imports that point up the house:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("lower,forbidden", [
    (("model", "data", "decode", "evaluate", "objective", "checkpoint"),
     ("train", "inference", "plots", "cli")),
    (("train",), ("plots",)),
    (("checkpoint",), ("model", "data")),
    (("plots",), ("model", "decode", "checkpoint", "inference")),
])
def test_the_named_rooms_do_not_reach_up(lower, forbidden):
  """The issue's own list (issue 13, 'Done when'), spelled out so a failure names the rule."""
  bad = [f"{relative(p)} imports {m}" for p in modules() if room(relative(p)) in lower
         for m in jaxformer_imports(p) if room(m) in forbidden]
  assert not bad, "\n".join(bad)


def test_the_tokenizer_is_a_leaf():
  imported = jaxformer_imports(PACKAGE / "data" / "tokenizer.py")
  assert imported <= {"jaxformer.tokens", "jaxformer.errors"}, imported


def test_importing_the_model_and_decoding_loads_no_data_library():
  code = ("import sys, jaxformer.model.transformer, jaxformer.decode; "
          "print(sorted(m for m in ('tensorflow_datasets', 'grain') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]", result.stdout


def test_drawing_loads_no_jax():
  code = "import sys, jaxformer.plots; print('jax' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "False", "plots.py draws from arrays; it needs no jax"


def private_uses(path: pathlib.Path) -> list[str]:
  """Imports of a private module (`jax._src`, `grain._src` ...) and `x._name` attribute reads
  of objects that are not this module's own (`self`, `cls`)."""
  uses = []
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or ""]
    uses += [f"line {node.lineno}: import {n}" for n in names
             if any(part.startswith("_") and part != "__future__" for part in n.split("."))]
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and node.attr not in PUBLIC_UNDERSCORE
        and isinstance(node.value, ast.Name)
        and node.value.id not in ("self", "cls")):
      uses.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
  return uses


def test_private_apis_live_in_one_module():
  found = {}
  for path in modules() + modules(ROOT / "benchmarks"):
    uses = private_uses(path)
    if uses and relative(path) != INTERNALS:
      found[relative(path)] = uses
  assert not found, f"private APIs outside {INTERNALS}: {found}"


def test_importing_every_module_changes_no_global_state_of_jax():
  """No lowering registered and no hook replaced until an entry point calls install()."""
  code = """
import importlib, pkgutil, sys
import jax, jax.extend, jax.numpy as jnp
import jaxformer
hook = sys.unraisablehook
for info in pkgutil.walk_packages(jaxformer.__path__, "jaxformer."):
  if not info.name.endswith("__main__"):
    importlib.import_module(info.name)
assert sys.unraisablehook is hook, "sys.unraisablehook replaced at import"
key, count = jnp.zeros(2, jnp.uint32), jnp.zeros(4096, jnp.uint32)
hlo = jax.jit(jax.extend.random.threefry_2x32).lower(key, count).compile().as_text()
print("rolled" if " while(" in hlo else "unrolled")
from jaxformer.train import jax_internals
jax_internals.install()
assert sys.unraisablehook is not hook
"""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "rolled", "a lowering was registered at import"


def long_functions(path: pathlib.Path) -> list[str]:
  return [f"{relative(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for node in ast.walk(ast.parse(path.read_text()))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_over_60_lines():
  found = [f for p in modules() + modules(ROOT / "benchmarks") for f in long_functions(p)]
  assert not found, "\n".join(found)
