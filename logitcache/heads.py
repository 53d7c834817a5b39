"""Per-teacher heads (CERBERUS): one output head per stored member on a shared student body.

Any student works whose last ``torch.nn.Linear`` with C outputs is its classifier and whose
layers after it treat classes independently (pooling over time, frame selection): that Linear
becomes one Linear with M x C outputs, head h being rows ``h*C:(h+1)*C``, so the body runs once
for all heads. Each head starts as a copy of the student's own classifier.

The prediction (``forward``) combines the heads as the cache combined its members into the
stored ensemble: the manifest's aggregation (``mean_prob`` by default: the mean of the heads'
probabilities, returned as logits, log(mean p) for softmax and logit(mean p) for sigmoid) and
its ensemble weights. Heads that matched their members exactly would then predict the stored
ensemble itself; a plain mean of logits would predict another ensemble than the one distilled,
unless the cache was dumped with ``mean_logit``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from logitcache.errors import LogitCacheError
from logitcache.targets import AGGREGATIONS, aggregate, kd_loss
from logitcache.views import MEMBER_PREFIX

HEADS = ("ensemble", "members")  # train(heads=...): today's single head, or one head per member


def check_heads(heads: str) -> str:
    if heads not in HEADS:
        raise LogitCacheError(f"--heads {heads!r}: unknown (choose {' or '.join(HEADS)})")
    return heads


def heads_aggregation(manifest: dict) -> tuple[str, list[float] | None]:
    """How the heads are combined: as the manifest's ensemble (aggregations this module does not
    know fall back to mean_prob)."""
    method = manifest.get("aggregation")
    return (method if method in AGGREGATIONS else "mean_prob"), manifest.get("weights")


class HeadsStudent(nn.Module):
    """``body`` whose classifier ``layer`` gives M x C logits; ``forward(x)`` the combined
    prediction (the shape a plain student gives), ``forward(x, all_heads=True)`` every head's
    logits ``[M, B, (T), C]`` in member order."""

    def __init__(self, body: nn.Module, layer: str, members: list[str], num_classes: int, kind: str,
                 aggregation: str = "mean_prob", weights: list[float] | None = None):
        super().__init__()
        self.body, self.layer, self.members = body, layer, list(members)
        self.num_classes, self.kind = int(num_classes), kind
        self.aggregation, self.weights = aggregation, weights

    def forward(self, wav: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        y = self.body(wav)
        z = y.unflatten(-1, (len(self.members), self.num_classes)).movedim(-2, 0)
        return z if all_heads else self.combine(z)

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        """The prediction from the heads' logits ``[M, ...]`` (see the module doc)."""
        return aggregate(list(z.unbind(0)), self.kind, self.aggregation, self.weights)

    def config(self) -> dict:
        """What a run folder records to rebuild this (``from_config``)."""
        return {"heads": "members", "head_members": self.members, "head_layer": self.layer,
                "head_aggregation": self.aggregation, "head_weights": self.weights}


def classifier_layer(model: nn.Module, spec: str, num_classes: int, probe: torch.Tensor) -> str:
    """Name of the last ``nn.Linear`` with ``num_classes`` outputs that runs in a forward pass."""
    called: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: called.append(n))
             for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
    if not called:
        raise LogitCacheError(f"student {spec}: --heads members splits the student's final torch.nn.Linear "
                              f"with {num_classes} outputs into one head per member, and it has none")
    return called[-1]


def _widen(model: nn.Module, layer: str, heads: int) -> None:
    """Replace Linear ``layer`` by one with ``heads`` copies of its outputs (same weights each)."""
    old = model.get_submodule(layer)
    new = nn.Linear(old.in_features, old.out_features * heads, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(heads, 1))
        if old.bias is not None:
            new.bias.copy_(old.bias.repeat(heads))
    parent, _, name = layer.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def with_heads(model: nn.Module, spec: str, members: list[str], num_classes: int, kind: str,
               view_shape: tuple[int, ...] | int, aggregation: str = "mean_prob",
               weights: list[float] | None = None, view_dtype: torch.dtype = torch.float32) -> HeadsStudent:
    """``model`` with its classifier split into one head per member. Refuses (one line) a student
    whose layers after the classifier mix classes: with every head a copy of the classifier, each
    head must give the plain student's output on a probe clip. ``view_dtype`` int64: the views
    are token ids, probed with random ids below ``num_classes`` (the vocabulary)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(0)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        shape = (view_shape,) if isinstance(view_shape, int) else tuple(view_shape)
        probe = (torch.randint(0, num_classes, (2, *shape), generator=g) if not view_dtype.is_floating_point
                 else 0.1 * torch.randn(2, *shape, generator=g)).to(device)
        layer = classifier_layer(model, spec, num_classes, probe)
        plain = model(probe).float()
        _widen(model, layer, len(members))
        student = HeadsStudent(model, layer, members, num_classes, kind, aggregation, weights)
        try:
            z = student(probe, all_heads=True).float()
            same = bool(torch.allclose(z, plain.expand_as(z), rtol=1e-4, atol=1e-5))
        except RuntimeError:  # e.g. a reshape that names C after the classifier
            same = False
    model.train(was_training)
    if not same:
        raise LogitCacheError(f"student {spec}: its layers after the classifier {layer!r} mix classes, so "
                              f"--heads members cannot split it into one head per member")
    return student


def from_config(model: nn.Module, config: dict, num_classes: int, kind: str,
                where: str = "config.json") -> HeadsStudent:
    """The heads student a run folder's ``config`` describes (``HeadsStudent.config``), untrained."""
    members, layer = config.get("head_members"), config.get("head_layer")
    aggregation = config.get("head_aggregation", "mean_prob")
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
        raise LogitCacheError(f"{where}: 'head_members' is {members!r}, not a list of member names")
    if aggregation not in AGGREGATIONS:
        raise LogitCacheError(f"{where}: 'head_aggregation' is {aggregation!r}, not one of "
                              f"{', '.join(AGGREGATIONS)}")
    try:
        found = isinstance(layer, str) and isinstance(model.get_submodule(layer), nn.Linear)
    except AttributeError:
        found = False
    if not found or model.get_submodule(layer).out_features != num_classes:
        raise LogitCacheError(f"{where}: 'head_layer' {layer!r} is not the student's classifier "
                              f"(a torch.nn.Linear with {num_classes} outputs)")
    _widen(model, layer, len(members))
    return HeadsStudent(model, layer, members, num_classes, kind, aggregation, config.get("head_weights"))


def heads_kd_loss(z_heads: torch.Tensor, batch: dict, codec, kind: str, temperature: float = 1.0,
                  device: torch.device | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over heads of each head's KD loss against its own member's targets: head h of
    ``z_heads`` ``[M, B, (T), C]`` against ``batch["members/<array>"][:, h]`` (a
    :class:`~logitcache.views.CacheStream` batch with ``members``), through the codec's loss
    (``codec`` None: a top-k triple, :func:`~logitcache.targets.kd_loss`). ``mask`` ``[B, L]``
    (token windows): only the unmasked positions of every head reach its loss."""
    from logitcache.lm import masked_rows

    losses = []
    for h in range(z_heads.shape[0]):
        own = {k[len(MEMBER_PREFIX):]: v[:, h] for k, v in batch.items() if k.startswith(MEMBER_PREFIX)}
        z = z_heads[h] if mask is None else z_heads[h][mask]
        if codec is None:
            t = tuple(own[k].to(device, non_blocking=True) for k in ("values", "indices", "stat"))
            losses.append(kd_loss(z, *(t if mask is None else masked_rows(t, mask)), kind, temperature))
        else:
            decoded = codec.from_arrays(own, device)
            losses.append(codec.loss(z, decoded if mask is None else masked_rows(decoded, mask), kind, temperature))
    return torch.stack(losses).mean()
