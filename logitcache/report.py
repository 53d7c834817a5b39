"""Looking at a cache: what it holds and costs (inspect), whether it is intact (verify), how well
its targets match the teachers and what a smaller k or another value dtype would lose (fidelity),
and whether a student trained from it matches the ensemble (compare). The CLI prints these dicts;
:mod:`logitcache.html` draws them.

    inspect_cache("run.zarr", project_samples=2_000_000)["projection"]["bytes_on_disk"]
    verify_cache("run.zarr")["ok"]
    fidelity("run.zarr", "data/train", ["teacher.pt2"], samples=64)["per_k"]
    compare("runs/kd", eval_data="data/eval", teachers=["teacher.pt2"])["eval"]["top1_agreement"]
    write_cache_report("report.html", "run.zarr", "data/train", ["teacher.pt2"], run="runs/kd")

Every function returns plain JSON-serialisable dicts (numbers, strings, lists), so ``--json``
output is the dict itself and the key names are part of the interface (see the README).

This module gathers the public names; the code lives in :mod:`logitcache.reports`, one module
per concern. The CLI calls them through here, so patching ``logitcache.report.inspect_cache``
(as the tests do) reaches the CLI too.
"""

from logitcache.reports.compare import compare
from logitcache.reports.fidelity import fidelity, k_grid, truncate_targets
from logitcache.reports.html_report import write_cache_report
from logitcache.reports.inspect import inspect_cache
from logitcache.reports.tables import format_table, human_bytes
from logitcache.reports.verify import verify_cache

__all__ = ["compare", "fidelity", "format_table", "human_bytes", "inspect_cache", "k_grid",
           "truncate_targets", "verify_cache", "write_cache_report"]
