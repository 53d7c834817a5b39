"""Looking at a cache, one module per concern; :mod:`logitcache.report` gathers the public names.

* :mod:`.inspect`: what a cache holds and costs (``inspect_cache``)
* :mod:`.verify`: whether it is intact (``verify_cache``)
* :mod:`.fidelity`: how well its targets match the teachers, and what a smaller k or another
  value dtype would lose (``fidelity``, ``k_grid``, ``truncate_targets``)
* :mod:`.compare`: whether a student trained from it matches the ensemble (``compare``)
* :mod:`.html_report`: the three as one HTML page (``write_cache_report``)
* :mod:`.tables`: the CLI's text tables (``format_table``, ``human_bytes``)

These modules import the library's lower layers (cache, targets, teachers, students, device,
metrics), never :mod:`logitcache.train` or :mod:`logitcache.dump`. This package imports none of
them itself, so ``from logitcache.reports.tables import format_table`` stays light.
"""
