"""Evaluation: how separations are scored.

Owns the metrics (:mod:`.metrics`: the MDX global SDR and BSS Eval v4 with a selectable backend,
their aggregation and tables), BSS Eval v4 on torch (:mod:`.bsseval`), the evaluation loop over a
test set (:mod:`.loop`) and the box plots of per-track scores (:mod:`.plots`). Imports
:mod:`demixlab.data` and the base modules; what separates is passed in as a callable.
"""
