"""Golden traces of SPEC.md and the plain-Python reference that writes them."""
