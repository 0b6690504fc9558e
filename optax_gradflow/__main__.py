"""``python -m optax_gradflow``: the same as the ``optax-gradflow`` command."""

from optax_gradflow.cli import main

if __name__ == "__main__":  # importing the module (documentation tools do) runs nothing
    raise SystemExit(main())
