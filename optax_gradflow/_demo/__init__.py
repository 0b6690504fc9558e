"""The demo application behind ``optax-gradflow demo``.

``optax-gradflow demo`` (or ``python -m optax_gradflow demo``) trains one
small Flax model three ways on a data stream with corrupted batches, prints a
comparison table, which run did best and the stabilizer's report, and writes a
PNG.

The scenario: a 4-layer ReLU MLP (Flax NNX, no normalisation) regresses a
smooth teacher function with Adam at learning rate 3e-3. The data stream is
what a real pipeline sometimes delivers: in 2% of the batches the targets are
off by a factor of 10^4 (a unit error upstream), and 0.2% of the batches
carry a missing target encoded as NaN. The three runs see exactly the same
batches:

* plain ``optax.adam``: each outlier batch kicks every weight by a few times
  the learning rate and inflates Adam's second moment, and the first NaN
  batch turns every parameter into NaN;
* ``optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0),
  optax.adam(lr)), max_consecutive_errors=10**6)``: what an optax user
  writes against NaN batches: outliers are clipped at a fixed norm, a
  non-finite update is dropped with Adam's state untouched;
* ``optax_gradflow.stabilized(optax.adam(lr), lr)`` with the default config:
  the threshold tracks the norms, outliers are clipped (explosions), NaN
  steps are skipped with Adam's state untouched. The loss is passed as
  ``value=`` (the loss gate); loss scaling is off by default.

The loss plotted and tabulated is the mean squared error on a fixed set of
clean examples, evaluated after every step. Which run does best is computed
from these numbers, not asserted: it depends on the seed and the steps.

The modules: :mod:`.scenario` (its numbers and its description, no framework
imported), :mod:`.training` (the model, the data stream, the three runs),
:mod:`.results` (the table, the findings, the figure) and :mod:`.app` (the
command's run, with its progress bar and event lines). ``optax_gradflow.cli``
imports :mod:`.scenario` for its help text and :mod:`.app` only when the
command runs.
"""
