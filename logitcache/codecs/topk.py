"""``topk``: raw top-k logits, their class ids, and the exact tail statistic (format 1's encoding).

Per row: ``values`` [(T,) k] in ``value_dtype`` (float16 or float32; float16 clamps to +-65504 so
log(0) = -inf round-trips), sorted descending; ``indices`` [(T,) k] in the smallest unsigned dtype
holding C; ``stat`` [(T)] float32 (see logitcache.targets). Top-20 of 527 in float16: 84 B.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.codecs import FLOAT16_MAX, TargetCodec, register_codec
from logitcache.targets import index_dtype, topk_targets

VALUE_DTYPES = ("float16", "float32")


@register_codec
class TopkCodec(TargetCodec):
    name = "topk"

    @classmethod
    def default_options(cls, value_dtype: str = "float16") -> dict:
        return {"value_dtype": value_dtype}

    @property
    def value_dtype(self) -> str:
        return self.options.get("value_dtype", "float16")

    @property
    def index_dtype(self) -> str:
        return self.options.get("index_dtype") or index_dtype(self.num_classes)

    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        row = (*self.frame, self.k)
        return {"values": (self.value_dtype, row), "indices": (self.index_dtype, row),
                "stat": ("float32", self.frame)}

    def chunk_sizing_bytes(self) -> int:
        # format 1 sized chunks by values + indices; kept so default chunk_rows stay what they were
        f = self.fields()
        return self.row_bytes() - int(np.prod(f["stat"][1], dtype=np.int64)) * 4

    def encode(self, logits: torch.Tensor, seeds=None) -> dict[str, torch.Tensor]:
        values, indices, stat = topk_targets(logits, self.k, self.kind)
        if self.value_dtype == "float16":
            values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        return {"values": values.to(getattr(torch, self.value_dtype)),
                "indices": indices.to(torch.int32 if logits.shape[-1] <= 2**31 else torch.int64),
                "stat": stat.float()}

    def narrow_dtypes(self) -> dict[str, torch.dtype]:
        dtype = getattr(torch, self.index_dtype, None)  # torch >= 2.3 has uint16/32/64
        return {"indices": dtype} if isinstance(dtype, torch.dtype) else {}

    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = np.asarray(host["values"])
        if values.dtype != np.dtype(self.value_dtype):
            v = values.astype(np.float32)
            if self.value_dtype == "float16":
                v = np.clip(v, -FLOAT16_MAX, FLOAT16_MAX)
            values = v.astype(self.value_dtype)
        return {"values": values, "indices": np.asarray(host["indices"]).astype(self.index_dtype, copy=False),
                "stat": np.asarray(host["stat"], np.float32)}

    def decode(self, arrays: dict[str, np.ndarray], sort: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return arrays["values"], arrays["indices"], arrays["stat"]

    def check(self, rows: dict[str, np.ndarray]) -> list[tuple[str, str]]:
        bad = [(f, msg) for f in ("values", "indices", "stat") if f in rows for msg in self._check_field(f, rows[f])]
        if "values" in rows and "stat" in rows:
            msg = self._check_stat(rows["stat"], rows["values"])
            if msg:
                bad.append(("stat", msg))
        return bad

    def _check_field(self, field: str, rows: np.ndarray) -> list[str]:
        bad = []
        if field in ("values", "stat") and not np.isfinite(rows).all():
            bad.append(f"{int((~np.isfinite(rows)).sum())} non-finite value(s)")
        elif field == "values" and rows.shape[-1] > 1 and not (rows[..., :-1] >= rows[..., 1:]).all():
            n = int((~(rows[..., :-1] >= rows[..., 1:]).all(-1)).sum())
            bad.append(f"{n} row(s) not sorted descending along k")
        elif field == "indices":
            top = int(rows.max()) if rows.size else 0
            if top >= self.num_classes:
                bad.append(f"class index {top} out of range (C={self.num_classes})")
            if rows.shape[-1] > 1:
                s = np.sort(rows, axis=-1)
                dup = int((s[..., 1:] == s[..., :-1]).any(-1).sum())
                if dup:
                    bad.append(f"{dup} row(s) repeat a class index")
        return bad

    def _check_stat(self, stat: np.ndarray, values: np.ndarray) -> str:
        """The tail statistic must agree with the top-k it was computed with (see targets.py).

        softmax: stat = logsumexp of all logits >= the top logit. sigmoid: stat = logit of the
        mean tail probability <= the k-th logit (every tail class is below it), and exactly 0 when
        k == C. Catches a stat chunk that was zeroed or mixed up with another chunk's.
        """
        v = values.astype(np.float64)
        s = stat.astype(np.float64)
        tol = np.abs(v) * 2 * np.finfo(np.dtype(self.value_dtype)).eps + 1e-4  # values were rounded
        if self.kind == "multiclass":
            bad = s < v[..., 0] - tol[..., 0]
            what = "below the top logit (a log-sum-exp cannot be)"
        elif values.shape[-1] == self.num_classes:
            bad = s != 0
            what = "not 0 although k == C (no tail)"
        else:
            bad = s > v[..., -1] + tol[..., -1]
            what = "above the k-th logit (the tail mean cannot be)"
        n = int(np.asarray(bad).reshape(len(stat), -1).any(-1).sum())
        return f"{n} row(s) with a tail statistic {what}" if n else ""
