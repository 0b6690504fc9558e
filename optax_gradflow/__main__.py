"""``python -m optax_gradflow``: the same as the ``optax-gradflow`` command."""

from optax_gradflow.cli import main

raise SystemExit(main())
