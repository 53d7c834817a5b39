"""Token windows that replay exactly: the ``tokens`` modality's augmenter.

A view is L token ids (int64 ``[L]``). Sample ``w{i}`` owns the slot ``[i L, (i + 1) L)`` of the
stream; its one drawn parameter, ``window.offset`` in [0, L), moves the window's start inside the
slot (uniformly, with probability ``p``; else 0), so each epoch sees the corpus at another
alignment and every token is still a window position about once per epoch (a start drawn
anywhere would repeat some tokens and skip others within an epoch). The offset is stored on the
integer grid like every other parameter, so training replays the same windows.

The mask (what the loss counts, :meth:`TokenAugmenter.targets`) is derived from the stored
offset and the source alone, so it replays too. Position t of a window predicts token t + 1; it
is masked when

* t + 1 is past the end of the stream (padding: the last windows are padded with id 0), or
* t + 1 starts a new document (the first token of a document cannot be predicted from the one
  before it). Windows may span documents, as nanoGPT's do; attention is not cut at boundaries.

Masked positions cost nothing in the loss (they are dropped before it is computed); their stored
targets are the teachers' outputs on the padded window, not used by anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logitcache.augment import SPEC_VERSION, Op, build_ops, draw_ops, load_ops_spec, param_grid_of, param_specs_of
from logitcache.errors import LogitCacheError

MODALITY = "tokens"
PAD_ID = 0


@dataclass
class TokenContext:
    context: int
    num_samples: int = 1
    sample_index: int = 0


class Window(Op):
    """The window's start inside its slot (tokens)."""

    name = "window"
    params = {"offset": ("float32", ())}  # whole tokens; float32 like every decoded parameter
    defaults = {"p": 1.0}

    def draw(self, u, ctx):
        offset = int(u[1] * ctx.context) if u[0] < self.hyper["p"] else 0
        return {"offset": np.float32(offset)}

    def grid(self, context: int):
        return {"offset": (1, 1, 0, context - 1)}


TOKEN_OPS = {Window.name: Window}
TOKEN_PRESETS: dict[str, list[dict]] = {"none": [], "offset": [{"op": "window"}]}
DEFAULT_PRESET = "offset"


def load_token_ops_spec(name_or_file: str) -> list[dict]:
    return load_ops_spec(name_or_file, TOKEN_PRESETS)


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LogitCacheError(f"token augmentation {what} {value!r} is not a positive whole number")
    return int(value)


class TokenAugmenter:
    """Windows of ``context`` token ids; the interface of :class:`logitcache.augment.Augmenter`."""

    modality = MODALITY
    view_dtype = torch.int64
    mixers: list[str] = []

    def __init__(self, ops: list[dict], context: int, vocab_size: int):  # context: L, stored as ``length``
        self.length, self.vocab_size = _whole(context, "context"), _whole(vocab_size, "vocab_size")
        self.ops: list[Op] = build_ops(ops, TOKEN_OPS, "token ")

    @classmethod
    def from_spec(cls, spec: dict) -> "TokenAugmenter":
        if spec.get("version") != SPEC_VERSION:
            raise LogitCacheError(f"augmentation spec version {spec.get('version')} is not supported "
                                  f"(this logitcache reads {SPEC_VERSION})")
        if not isinstance(spec.get("ops"), list):
            raise LogitCacheError(f"augmentation spec 'ops' is {spec.get('ops')!r}, not a list of ops")
        return cls(spec["ops"], spec.get("context"), spec.get("vocab_size"))

    @property
    def spec(self) -> dict:
        return {"version": SPEC_VERSION, "modality": MODALITY, "context": self.length,
                "vocab_size": self.vocab_size, "ops": [op.spec() for op in self.ops]}

    @property
    def view_shape(self) -> tuple[int]:
        return (self.length,)

    @property
    def param_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return param_specs_of(self.ops)

    def param_grid(self) -> dict[str, dict]:
        return param_grid_of(self.ops, self.length)

    def context(self, **kw) -> TokenContext:
        """The draw context; the audio/image keywords (partners, source size) do not apply."""
        return TokenContext(self.length, **{k: v for k, v in kw.items() if k in ("num_samples", "sample_index")})

    def draw(self, seed: int, ctx: TokenContext) -> dict[str, np.ndarray]:
        return draw_ops(self.ops, seed, ctx)

    def offset(self, params: dict[str, np.ndarray] | None) -> int:
        if not params or "window.offset" not in params:
            return 0
        return int(np.rint(float(np.asarray(params["window.offset"]).reshape(()))))

    def _span(self, source: torch.Tensor, params, extra: int) -> torch.Tensor:
        """``context + extra`` ids from the stored offset, padded with PAD_ID past the stream's end."""
        if source.dim() != 2 or source.shape[0] != 2:
            raise LogitCacheError(f"token source has shape {list(source.shape)}, not [2, S] (ids, documents)")
        o = self.offset(params)
        ids = source[0, o:o + self.length + extra]
        return torch.nn.functional.pad(ids, (0, self.length + extra - ids.shape[0]), value=PAD_ID)

    def fit(self, source: torch.Tensor, params: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        return self._span(source, params, 0).to(torch.int64).contiguous()

    def apply(self, source: torch.Tensor, params: dict[str, np.ndarray], ctx=None) -> torch.Tensor:
        """The view the teachers see: int64 ``[context]`` token ids."""
        return self.fit(source, params)

    def targets(self, source: torch.Tensor, params: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token ids int64 ``[L]``, -1 where masked; mask bool ``[L]``) of the window (see
        the module doc for the rule)."""
        o, L = self.offset(params), self.length
        nxt = self._span(source, params, 1)[1:]
        doc = source[1, o:o + L + 1]
        valid = torch.zeros(L, dtype=torch.bool)
        have = max(0, min(L, doc.shape[0] - 1))  # positions whose next token exists
        valid[:have] = doc[1:have + 1] == doc[:have]
        return torch.where(valid, nxt, torch.full_like(nxt, -1)), valid

    def window(self, source: torch.Tensor, params: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, ...]:
        """(``apply``, *``targets``) in one pass: ids [L], next-token ids [L] (-1 where masked), mask
        [L]; the same values, at a fraction of the per-window cost (a training read of 1M tokens/s
        replays ~1,000 windows of 1,024 a second)."""
        if source.dim() != 2 or source.shape[0] != 2:
            raise LogitCacheError(f"token source has shape {list(source.shape)}, not [2, S] (ids, documents)")
        o, L = self.offset(params), self.length
        seg = source[:, o:o + L + 1].numpy()
        have = max(0, min(L, seg.shape[1] - 1))  # positions whose next token exists
        ext = np.full(L + 1, PAD_ID, np.int64)
        ext[:seg.shape[1]] = seg[0]
        valid = np.zeros(L, bool)
        np.equal(seg[1, 1:have + 1], seg[1, :have], out=valid[:have])
        nxt = np.where(valid, ext[1:], -1)
        return torch.from_numpy(ext[:L]), torch.from_numpy(nxt), torch.from_numpy(valid)

    def probe_views(self, n: int) -> torch.Tensor:
        """``n`` seeded random windows for probing teachers (ids drawn over the vocabulary)."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab_size, (n, self.length), generator=g, dtype=torch.int64)
