"""``fidelity`` of recompositions: each composition of stored members (``logitcache.recompose``)
against the same composition of the re-run teachers, on the same replayed views.

Figures per composition (rows = views, view frames, or the unmasked positions of token windows):
``kl_mean``, ``kl_max`` of KL(true recomposed || recomposed from the cache)
(``targets.kl_divergence`` on the dense reconstruction, tail spread evenly, as fidelity's own
figures), ``top1_agreement`` of the two, and ``width`` (classes listed per recomposed row,
min(M k, C)). ~0 when k == C.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.recompose import Composition, dense_ensemble, requested
from logitcache.recompose import targets as recomposed_targets
from logitcache.targets import kl_divergence


class Recompositions:
    """Collects the figures of each requested composition, batch by batch."""

    def __init__(self, cache, teacher_names: list[str], ensemble=None, ensemble_weights=None,
                 aggregation: str | None = None, member_weighting: str | None = None,
                 compositions: list[dict] | None = None):
        comps = [requested(cache, ensemble, ensemble_weights, aggregation, member_weighting)]
        comps += [requested(cache, **{"ensemble": None, **c}) for c in compositions or []]
        self.comps: list[Composition] = [c for c in comps if c is not None]
        if self.comps and len(teacher_names) != len(cache.members):
            raise LogitCacheError(f"--ensemble: {len(teacher_names)} --teacher given, cache {cache.path} stores "
                                  f"{len(cache.members)} members; give the dump's teachers, in order (member i is "
                                  f"re-run by --teacher i)")
        self.cache, self.kind, self.C = cache, cache.output_kind, len(cache.classes)
        self.position = {name: i for i, name in enumerate(cache.members)}
        self.parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.comps]

    def add(self, epoch: int, ids: list[str], logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """``logits``: the re-run members' rows; with ``mask`` (token windows, ``[S, L]``) only the
        unmasked positions', as fidelity's :func:`~logitcache.reports.fidelity._kept` gives them."""
        from logitcache.reports.fidelity import _dense_log_targets, _kept

        for comp, parts in zip(self.comps, self.parts):
            true = dense_ensemble([logits[self.position[n]].cpu() for n in comp.members], self.kind, comp)
            v, i, s = (_kept(torch.from_numpy(np.asarray(x)), mask)
                       for x in recomposed_targets(self.cache, epoch, ids, comp))
            rec = _dense_log_targets(v, i, s, self.C, self.kind)
            z = true.double().reshape(-1, self.C)
            rec = rec.reshape(-1, self.C)
            parts.append({"kl": kl_divergence(z, rec, self.kind), "top1": (z.argmax(-1) == rec.argmax(-1)).double(),
                          "width": torch.full((1,), float(v.shape[-1]))})

    def result(self) -> list[dict]:
        out = []
        for comp, parts in zip(self.comps, self.parts):
            kl, top1 = (torch.cat([p[k] for p in parts]) for k in ("kl", "top1"))
            out.append({**comp.describe(), "rows": int(kl.numel()), "kl_mean": float(kl.mean()),
                        "kl_max": float(kl.max()), "top1_agreement": float(top1.mean()),
                        "width": int(parts[0]["width"][0])})
        return out
