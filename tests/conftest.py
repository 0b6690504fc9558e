"""Shared test helpers."""

import os

# Tests run on the CPU; a GPU machine would otherwise preallocate its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
