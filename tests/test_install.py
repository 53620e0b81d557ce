"""Installs that reproduce: constraints.txt pins what pyproject.toml asks for, every import of
jaxformer is a declared dependency, the installers use the pins, and a wheel runs on its own.

All but the last read files (and run launch.sh over a stand-in Python); the last builds a wheel
and trains with it from outside the repository.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from jaxformer import launcher
from tests import run_testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
# Import names whose distribution is named otherwise (PEP 503 names); any other import name is
# its own distribution's name.
DISTRIBUTION_OF = {
    "orbax": "orbax-checkpoint", "ml_collections": "ml-collections",
    "tensorboardX": "tensorboardx", "tensorflow_datasets": "tensorflow-datasets",
    "array_record": "array-record", "sentencepiece": "sentencepiece", "etils": "etils",
}
UNPINNED = os.environ.get(launcher.UNPINNED_VARIABLE, "0") not in ("", "0")


def pyproject() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]


def requirements(*extras: str, runtime: bool = True) -> list[Requirement]:
  """pyproject's runtime dependencies (unless not `runtime`) and those of `extras`."""
  project = pyproject()
  texts = list(project["dependencies"]) if runtime else []
  for extra in extras:
    texts += project["optional-dependencies"][extra]
  return [Requirement(t) for t in texts]


def pins() -> dict[str, str]:
  """constraints.txt as {canonical name: version}; every line is a `name==version` pin."""
  found = {}
  for line in CONSTRAINTS.read_text().splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    name, sep, version = line.partition("==")
    assert sep and name.strip() and version.strip(), f"not a name==version pin: {line!r}"
    key = canonicalize_name(name)
    assert key not in found, f"{name} is pinned twice"
    found[key] = version.strip()
  return found


def test_constraints_pin_every_dependency_of_pyproject():
  pinned = pins()
  missing = [str(r) for r in requirements("test") if canonicalize_name(r.name) not in pinned]
  assert not missing, (f"constraints.txt lacks {missing}: refresh it (tools/constraints.py, "
                       "README 'Tests')")
  assert "jaxformer" not in pinned, "the project itself is installed from the checkout"


def test_every_pin_satisfies_the_floor_of_pyproject():
  pinned = pins()
  wrong = []
  for r in requirements(*pyproject()["optional-dependencies"]):  # jax[tpu]>=0.8 too.
    version = pinned.get(canonicalize_name(r.name))
    if version is not None and not r.specifier.contains(Version(version), prereleases=True):
      wrong.append(f"{r} but constraints.txt has {version}")
  assert not wrong, "pins outside pyproject's range:\n" + "\n".join(wrong)


def third_party_imports(*roots: pathlib.Path) -> dict[str, set[str]]:
  """{top-level import name: files} of every absolute import, at the top or inside a function,
  that is neither the standard library nor jaxformer."""
  found: dict[str, set[str]] = {}
  for root in roots:
    for path in sorted(root.rglob("*.py")):  # rglob does not follow jaxformer/experiments.
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          names = [node.module]
        else:
          continue
        for top in {n.split(".")[0] for n in names}:
          if top not in sys.stdlib_module_names and top != "jaxformer":
            found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
  return found


def test_every_third_party_import_is_a_declared_dependency():
  extras = [e for e in pyproject()["optional-dependencies"] if e != "test"]
  declared = {canonicalize_name(r.name) for r in requirements(*extras)}
  imports = third_party_imports(ROOT / "jaxformer", ROOT / "experiments")
  undeclared = {name: sorted(files) for name, files in imports.items()
                if canonicalize_name(DISTRIBUTION_OF.get(name, name)) not in declared}
  assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
  # The map agrees with the installed packages, for those installed here.
  installed = importlib.metadata.packages_distributions()
  wrong = {name: installed[name] for name in imports if name in installed
           and canonicalize_name(DISTRIBUTION_OF.get(name, name))
           not in {canonicalize_name(d) for d in installed[name]}}
  assert not wrong, f"DISTRIBUTION_OF maps these imports wrongly: {wrong}"


def test_the_tpu_workers_install_the_pinned_versions_unless_told_not_to(monkeypatch):
  def setup_command() -> str:
    steps = launcher.tpu_commands(["train", "--workdir", "gs://bucket/run"], "pod", "zone-a",
                                  None, None, str(ROOT))
    return next(s[-1] for s in steps if "pip install" in s[-1])
  monkeypatch.delenv(launcher.UNPINNED_VARIABLE, raising=False)
  assert "pip install -q --python .venv/bin/python -c constraints.txt -e '.[tpu]'" in (
      setup_command())
  monkeypatch.setenv(launcher.UNPINNED_VARIABLE, "1")
  assert "-c constraints.txt" not in setup_command() and "-e '.[tpu]'" in setup_command()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for a virtualenv's python: answers launch.sh's questions, records its pip installs.
case "$1" in
  -c) [[ "$2" == *sys.prefix* ]] && echo "$FAKE_PREFIX"; exit 0 ;;
  -m) [[ "$2 $3" == "pip install" && "$*" != *"--upgrade pip"* ]] && echo "$*" >> "$FAKE_LOG"
      exit 0 ;;
esac
"""


def test_launch_sh_installs_the_pinned_versions_and_reinstalls_when_the_pins_change(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(FAKE_PYTHON)
  (venv / "bin" / "python").chmod(0o755)
  log = tmp_path / "installs.log"
  env = dict(os.environ, VIRTUAL_ENV=str(venv), FAKE_PREFIX=str(venv), FAKE_LOG=str(log))
  env.pop(launcher.UNPINNED_VARIABLE, None)
  env.pop("JAXFORMER_EXTRAS", None)  # CI sets it for the suite itself.

  def installs(**extra_env) -> list[str]:
    before = log.read_text().splitlines() if log.exists() else []
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), "test"], env={**env, **extra_env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return (log.read_text().splitlines() if log.exists() else [])[len(before):]

  pinned = f"-m pip install -q -c {ROOT}/constraints.txt -e {ROOT}[test]"
  assert installs() == [pinned]
  assert installs() == []  # Installed, and nothing changed: no reinstall.
  assert installs(JAXFORMER_UNPINNED="1") == [f"-m pip install -q -e {ROOT}[test]"]
  assert installs() == [pinned]  # Back to the pins.
  # An extra asked for (CI asks for interop) is installed beside test, and stays asked for.
  with_interop = pinned.replace("[test]", "[test,interop]")
  assert installs(JAXFORMER_EXTRAS="interop") == [with_interop]
  assert installs(JAXFORMER_EXTRAS="interop") == []
  assert installs() == [pinned]
  # The stamp holds the checksum of constraints.txt: a refreshed file reinstalls.
  checksums = [subprocess.run(f"cksum < {ROOT / name}", shell=True, capture_output=True,
                              text=True, check=True).stdout.strip()
               for name in ("pyproject.toml", "constraints.txt")]
  assert (venv / ".jaxformer-installed").read_text().split() == [*" ".join(checksums).split(),
                                                                 "[test]"]


def _wheel_venv(tmp_path: pathlib.Path) -> pathlib.Path:
  """A wheel built from a copy of the sources, installed into a new virtualenv that sees the
  packages installed here (a .pth line: no .pth file of theirs runs, so not this checkout's
  editable jaxformer). pip installs the wheel alone, offline: every dependency must already be
  installed, at its constraints.txt version. Returns the virtualenv's bin directory.

  Every command runs outside the checkout, without PYTHONPATH: pip would take a jaxformer it
  finds there (an editable install's jaxformer.egg-info) as installed already, and skip the wheel.
  """
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

  def run(*command, **kwargs):
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)

  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for name in ("jaxformer", "experiments"):  # jaxformer/experiments stays a symlink.
    shutil.copytree(ROOT / name, source / name, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  dist, venv = tmp_path / "dist", tmp_path / "venv"
  run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source),
      check=True)
  run(sys.executable, "-m", "venv", "--without-pip", str(venv), check=True)
  python = str(venv / "bin" / "python")
  purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                check=True).stdout.strip()
  here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  pathlib.Path(purelib, "installed-here.pth").write_text("\n".join(sorted(here)) + "\n")
  pins_args = [] if UNPINNED else ["-c", str(CONSTRAINTS)]
  (wheel,) = dist.glob("jaxformer-*.whl")
  result = run(python, "-m", "pip", "install", "-q", "--no-index", *pins_args, str(wheel))
  assert result.returncode == 0, f"the installed packages do not meet the pins:\n{result.stderr}"
  return venv / "bin"


@pytest.mark.slow
def test_a_wheel_trains_the_default_experiment_outside_the_repository(tmp_path):
  """Also `--version` and the experiments' files in the wheel. Not covered: building offline
  (pip's isolated build fetches setuptools from the index or its cache), installing the
  dependencies themselves (the new environment sees them, pip installs none), the sdist, and
  the extras (cuda, tpu)."""
  bin_dir = _wheel_venv(tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(XLA_FLAGS=run_testing.FAST_COMPILE_FLAGS, JAX_PLATFORMS="cpu")

  def jaxformer(*args: str) -> str:
    result = subprocess.run([str(bin_dir / "jaxformer"), *args], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  where = subprocess.run([str(bin_dir / "python"), "-c",
                          "import jaxformer; print(jaxformer.__file__)"],
                         cwd=outside, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout  # The wheel's code.
  assert jaxformer("--version").strip() == f"jaxformer {pyproject()['version']}"
  # The experiments came along, those that load others and the sample texts included.
  keys = dict(line.split(" = ", 1) for line in jaxformer("info", "--keys", "--config",
                                                         "text_files").splitlines())
  texts = keys["data.train_files"].split()[0].strip("'").split(",")
  assert all(path.startswith(str(tmp_path / "venv")) and os.path.isfile(path) for path in texts)
  assert "'sort'" in jaxformer("info", "--keys", "--config", "sort")  # loads 'copy'
  tiny = [f"--config.{k}={v}" for k, v in run_testing.TINY.items()]
  jaxformer("train", "--config", "default", "--workdir", "w", "--config.train.steps=3", *tiny)
  assert (outside / "w" / "checkpoints" / "3").is_dir()
