"""`python -m jaxformer ...` is the same as the `jaxformer` console script."""

from jaxformer.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
