"""Engine integrations for LENS (arXiv 2510.08696).

- :mod:`lens_kernels.integrations.verl`: the ``lens``, ``lens-mixed-only`` and
  ``lens-negative-only`` advantage estimators for verl, loaded through verl's ``verl.plugins``
  entry point (see ``docs/integrations-verl.md``).
- :mod:`lens_kernels.integrations.trl`: ``LensGRPOConfig`` and ``LensGRPOTrainer`` for TRL
  (see ``docs/integrations-trl.md``).

Nothing is imported here: each submodule imports its engine, which is an optional
dependency (``pip install "lens-kernels[verl]"`` or ``"lens-kernels[trl]"``).
"""
