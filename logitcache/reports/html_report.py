"""``write_cache_report``: inspect, fidelity and compare of one cache drawn as one HTML page."""

from __future__ import annotations

from pathlib import Path

from logitcache.reports.compare import compare
from logitcache.reports.fidelity import fidelity
from logitcache.reports.inspect import inspect_cache
from logitcache.storage import is_url


def write_cache_report(out_html: str | Path, cache: str | Path, data: str | Path, teachers: list[str], *,
                       run: str | Path | None = None, eval_data: str | Path | None = None, samples: int = 64,
                       compare_samples: int = 256, seed: int = 0, device: str = "auto",
                       state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
                       progress: bool = False, student: str | None = None, trust_run: bool = False) -> dict:
    """One HTML report of a cache: inspect, fidelity (teachers re-run on ``samples`` stored views)
    and, given a training ``run``, compare (``student``, ``trust_run``: as for :func:`compare`).
    Returns ``{"html", "inspect", "fidelity", "compare"}``."""
    from logitcache.html import write_report

    info = inspect_cache(cache)
    fid = fidelity(cache, data, teachers, samples=samples, seed=seed, device=device,
                   state_dicts=state_dicts, teacher_args=teacher_args, progress=progress)
    cmp = None
    if run is not None:
        cmp = compare(run, cache, data, eval_data=eval_data, teachers=teachers if eval_data else None,
                      state_dicts=state_dicts, teacher_args=teacher_args, samples=compare_samples, seed=seed,
                      device=device, progress=progress, student=student, trust_run=trust_run)
    path = write_report(out_html, inspect=info, fidelity=fid, compare=cmp,
                        title=f"logitcache report: {str(cache).rstrip('/').rpartition('/')[2]}",
                        subtitle=f"{cache if is_url(cache) else Path(cache).resolve()} ·")
    return {"html": str(path), "inspect": info, "fidelity": fid, "compare": cmp}
