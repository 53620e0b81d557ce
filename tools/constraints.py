"""Writes constraints.txt: the installed version of every distribution jaxformer depends on.

`./launch.sh`, CI (through it) and the TPU workers install with `-c constraints.txt`, so every
environment gets the versions the tests passed with. Run this in the environment the tests
passed in; it pins what pyproject.toml asks for (the runtime dependencies and the `test` extra)
and, transitively, what those ask for, as installed here: the closure of the requirement graph,
with each package's markers evaluated for this interpreter and the extras asked of it. Nothing
else installed here (a linter, a profiler) is pinned. Refreshing (README, "Tests"):

  python3 -m venv /tmp/fresh
  JAXFORMER_UNPINNED=1 JAXFORMER_EXTRAS=interop VIRTUAL_ENV=/tmp/fresh ./launch.sh test
  /tmp/fresh/bin/python tools/constraints.py                      # rewrites constraints.txt

`python tools/constraints.py -` prints the file instead of writing it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "jaxformer"
EXTRAS = ("test", "interop")  # What launch.sh (and CI, with the interop extra) tests with.


def project_requirements(pyproject: str = os.path.join(ROOT, "pyproject.toml")
                         ) -> list[Requirement]:
  """The runtime dependencies of pyproject.toml and those of its EXTRAS."""
  with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
  texts = list(project["dependencies"])
  for extra in EXTRAS:
    texts += project["optional-dependencies"][extra]
  return [Requirement(t) for t in texts]


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
  """Whether `requirement` holds here, for a package installed with `extras`."""
  if requirement.marker is None:
    return True
  return any(requirement.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
  """Every installed distribution `requirements` reach, by canonical name. A requirement that
  is missing here, or installed at a version it excludes, is an error: then this environment
  is not one that could have passed the tests."""
  found: dict[str, importlib.metadata.Distribution] = {}
  seen: set[tuple[str, frozenset[str]]] = set()
  todo = [(r, frozenset()) for r in requirements]
  while todo:
    requirement, parent_extras = todo.pop()
    name = canonicalize_name(requirement.name)
    extras = frozenset(requirement.extras)
    if name == PROJECT or not _applies(requirement, parent_extras) or (name, extras) in seen:
      continue
    seen.add((name, extras))
    try:
      dist = importlib.metadata.distribution(requirement.name)
    except importlib.metadata.PackageNotFoundError:
      sys.exit(f"error: {requirement} is not installed in {sys.prefix}")
    if not requirement.specifier.contains(dist.version, prereleases=True):
      sys.exit(f"error: {requirement} is not met: {sys.prefix} has {dist.version}")
    found[name] = dist
    todo += [(Requirement(r), extras) for r in dist.requires or ()]
  return found


def render(dists: dict[str, importlib.metadata.Distribution]) -> str:
  """The file: a header saying where it came from, then `Name==version` lines (as pip freeze
  writes them), sorted by name."""
  header = [
      "# The tested version of every dependency of jaxformer (runtime, test and interop extras),",
      "# transitive ones included, written by `python tools/constraints.py` in the environment",
      f"# the tests passed in: Python {platform.python_version()}, {sys.platform} "
      f"{platform.machine()}.",
      "# Installs use it (`pip install -c constraints.txt ...`); JAXFORMER_UNPINNED=1 opts out.",
      "# Refresh it when pyproject.toml changes: README, Tests.",
  ]
  # A local version label (torch's `+cpu`) names a build, not a release on the package index:
  # `==2.13.0` takes whichever build of 2.13.0 the machine finds (`+cpu` where it lies on disk).
  pins = [f"{d.metadata['Name']}=={d.version.split('+')[0]}" for _, d in sorted(dists.items())]
  return "\n".join(header + pins) + "\n"


def main(argv: list[str]) -> int:
  out = argv[0] if argv else os.path.join(ROOT, "constraints.txt")
  text = render(closure(project_requirements()))
  if out == "-":
    sys.stdout.write(text)
  else:
    with open(out, "w", encoding="utf-8") as f:
      f.write(text)
    print(f"{out}: {text.count('==')} pins", file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
