"""``tokens``: a token stream for language-model distillation, in one of two layouts.

* ``bin`` (nanoGPT): a flat ``.bin`` of ``uint16`` or ``uint32`` token ids and a small JSON beside
  it (same stem, or named by ``--data``)::

      {"vocab_size": 50257, "dtype": "uint16", "documents": [0, 1834, ...], "block_size": 256}

  ``documents``: the token offset where each document starts (optional: one document);
  ``bin``: the token file (optional: the JSON's stem + ``.bin``); ``tokenizer``: the local
  ``tokenizers`` file the ids come from (optional: then the cache's vocabulary fingerprint holds
  every id's token, so a corpus of another tokenizer of the same size is refused).
* ``jsonl``: JSON lines of text and a tokenizer file the user names (``tokenizers`` library,
  local files only), tokenised once, in memory, into the same layout (one document per line)::

      {"jsonl": "corpus.jsonl", "tokenizer": "tokenizer.json", "text_field": "text", "block_size": 64}

A sample is a window *slot*: sample ``w{i}`` is the i-th block of ``block_size`` (L) tokens. The
view of a sample is L token ids starting at ``i * L + offset`` (the augmenter draws the offset
in [0, L), see :mod:`logitcache.augment_tokens`), so a sample's source is the span
``[i L, i L + 2 L)`` of the stream: the ids and each position's document (relative to the span's
first), decoded as an int64 ``[2, S]`` tensor. Its content crc is the crc32 of that span (ids and
document starts), so a changed corpus is refused wherever a window is replayed.

Labels are the next tokens themselves (:meth:`TokenSource`'s table holds no per-sample label;
training takes them from the window), so no N x V matrix is ever made.
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.labels import LabelTable
from logitcache.sources import Source, register_source
from logitcache.vocabulary import Vocabulary

DEFAULT_BLOCK_SIZE = 256
TOKEN_DTYPES = ("uint16", "uint32")


@register_source
class TokenSource(Source):
    """A token stream (``bin`` or ``jsonl`` layout, detected from the JSON given)."""

    kind = "tokens"
    modality = "tokens"

    def __init__(self, root: str | Path, block_size: int | None = None):
        path = Path(root)
        if path.suffix.lower() == ".bin":
            path = path.with_suffix(".json")
        if not path.is_file():
            raise LogitCacheError(f"{path}: token corpus description not found (a nanoGPT .bin needs a .json beside "
                                  f"it with vocab_size and dtype)")
        self.root = self.meta_path = path
        meta = _read_json(path)
        self.layout = "jsonl" if "jsonl" in meta else "bin"
        tokens, docs, vocab = (_from_jsonl if self.layout == "jsonl" else _from_bin)(path, meta)
        self._init(tokens, docs, vocab, block_size if block_size is not None else meta.get("block_size"))

    @classmethod
    def from_jsonl(cls, jsonl: str | Path, tokenizer: str | Path, block_size: int,
                   text_field: str = "text") -> "TokenSource":
        """A JSONL corpus tokenised with ``tokenizer`` (a local ``tokenizers`` JSON file)."""
        self = cls.__new__(cls)
        self.root = self.meta_path = Path(jsonl)
        self.layout = "jsonl"
        meta = {"jsonl": str(Path(jsonl).resolve()), "tokenizer": str(Path(tokenizer).resolve()),
                "text_field": text_field}
        tokens, docs, vocab = _from_jsonl(self.root, meta)
        self._init(tokens, docs, vocab, block_size)
        return self

    def _init(self, tokens: np.ndarray, docs: np.ndarray, vocab: Vocabulary, block_size) -> None:
        L = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise LogitCacheError(f"{self.meta_path}: block_size must be a positive whole number (got {L!r})")
        if len(tokens) < 2:
            raise LogitCacheError(f"{self.meta_path}: the corpus holds {len(tokens)} token(s); a window needs 2")
        self.tokens, self.doc_starts, self.vocab_size, self.block_size = tokens, docs, len(vocab), int(L)
        n = -(-(len(tokens) - 1) // L)  # every target position is in some slot's offset-0 window
        ids = [f"w{i}" for i in range(n)]
        self.table = LabelTable(ids, vocab, np.zeros(n + 1, np.int64), np.zeros(0, np.int32))

    # ------------------------------------------------------------------ Source
    @property
    def labels_file(self) -> Path:
        return self.meta_path

    def span(self, index: int) -> tuple[int, int]:
        """The token offsets ``[a, b)`` a sample's windows can read (ids and next tokens)."""
        a = int(index) * self.block_size
        return a, min(a + 2 * self.block_size, len(self.tokens))

    def path_of(self, index: int) -> str:
        a, b = self.span(index)
        return f"{self.meta_path} tokens [{a}, {b})"

    def load_with_crc(self, index: int) -> tuple[torch.Tensor, int]:
        a, b = self.span(index)
        raw = np.asarray(self.tokens[a:b])
        out = np.empty((2, b - a), np.int64)
        out[0] = raw
        # each position's document relative to the span's first: a step up at every start in (a, b)
        # (a training read does this per window; a search per position cost ~20x more)
        inner = self.doc_starts[np.searchsorted(self.doc_starts, a, side="right"):
                                np.searchsorted(self.doc_starts, b, side="left")]
        if len(inner):
            out[1] = 0
            out[1, inner - a] = 1
            np.cumsum(out[1], out=out[1])
            doc = out[1].astype("<i4").tobytes()
        else:
            out[1] = 0
            doc = _zeros(4 * (b - a))
        ids = raw if raw.dtype == np.dtype("<u4") else raw.astype("<u4")
        crc = zlib.crc32(doc, zlib.crc32(np.ascontiguousarray(ids)))
        return torch.from_numpy(out), crc

    def scan(self) -> None:
        top = int(np.max(self.tokens))
        if top >= self.vocab_size:
            at = int(np.argmax(np.asarray(self.tokens) >= self.vocab_size))
            raise LogitCacheError(f"{self.meta_path}: token id {int(self.tokens[at])} at offset {at} is outside "
                                  f"the vocabulary (vocab_size {self.vocab_size})")

    def dataset_entry(self) -> dict:
        return {"tokens": int(len(self.tokens)), "documents": int(len(self.doc_starts)),
                "path": str(self.meta_path.resolve())}

    def defaults(self) -> dict:
        return {"context": self.block_size, "vocab_size": self.vocab_size}

    def configure(self, spec: dict) -> "TokenSource":
        have = {"context": self.block_size, "vocab_size": self.vocab_size}
        for key, value in have.items():
            if spec.get(key) != value:
                raise LogitCacheError(f"{self.meta_path}: {'block_size' if key == 'context' else key} {value} here, "
                                      f"but the views were made with {spec.get(key)}")
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "layout": self.layout, "block_size": self.block_size,
                "vocab_size": self.vocab_size}


@lru_cache(maxsize=8)
def _zeros(nbytes: int) -> bytes:
    return bytes(nbytes)


# ------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LogitCacheError(f"{path}: not a readable JSON corpus description ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise LogitCacheError(f"{path}: expected a JSON object with vocab_size and dtype (or jsonl and tokenizer)")
    return doc


def _from_bin(path: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    dtype, vocab = meta.get("dtype"), meta.get("vocab_size")
    if dtype not in TOKEN_DTYPES:
        raise LogitCacheError(f"{path}: dtype {dtype!r} must be one of {', '.join(TOKEN_DTYPES)}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise LogitCacheError(f"{path}: vocab_size must be a positive whole number (got {vocab!r})")
    if dtype == "uint16" and vocab > 2**16:
        raise LogitCacheError(f"{path}: vocab_size {vocab} does not fit dtype uint16 (use uint32)")
    bin_path = path.parent / meta.get("bin", path.with_suffix(".bin").name)
    if not bin_path.is_file():
        raise LogitCacheError(f"{bin_path}: token file not found (named by {path})")
    size, item = bin_path.stat().st_size, np.dtype(dtype).itemsize
    if size % item:
        raise LogitCacheError(f"{bin_path}: {size} bytes is not a whole number of {dtype} tokens")
    tokens = np.memmap(bin_path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
    named = meta.get("tokenizer")
    if named is not None and (not isinstance(named, str) or not named):
        raise LogitCacheError(f"{path}: tokenizer must be the name of a local tokenizers file (got {named!r})")
    vocabulary = Vocabulary(vocab) if not named else Vocabulary.of_tokenizer(
        vocab, _tokenizer(path, path.parent / named), path.parent / named)
    return tokens, _documents(path, meta.get("documents", [0]), len(tokens)), vocabulary


def _documents(path: Path, starts, n: int) -> np.ndarray:
    d = np.asarray(starts if starts else [0])
    if d.ndim != 1 or d.dtype.kind not in "iu" or d[0] != 0 or (np.diff(d) <= 0).any() or d[-1] >= max(n, 1):
        raise LogitCacheError(f"{path}: documents must be increasing token offsets starting at 0, each below the "
                              f"{n} tokens")
    return d.astype(np.int64)


def _tokenizer(path: Path, tok_path: Path):
    """The ``tokenizers.Tokenizer`` in local file ``tok_path`` (named by ``path``)."""
    from tokenizers import Tokenizer

    if not tok_path.is_file():
        raise LogitCacheError(f"{tok_path}: tokenizer file not found (named by {path}; a local tokenizers JSON)")
    try:
        return Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise LogitCacheError(f"{tok_path}: not a tokenizers file ({str(e).splitlines()[0][:160]})") from None


def _from_jsonl(path: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, Vocabulary]:
    text_path, tok_path = path.parent / meta["jsonl"], path.parent / meta.get("tokenizer", "")
    if not meta.get("tokenizer"):
        raise LogitCacheError(f"{tok_path}: tokenizer file not found (named by {path}; a local tokenizers JSON)")
    tok = _tokenizer(path, tok_path)
    field = meta.get("text_field", "text")
    texts = []
    try:
        with open(text_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get(field), str):
                        raise LogitCacheError(f"{text_path}:{n}: no text field {field!r}")
                    texts.append(row[field])
    except ValueError as e:
        raise LogitCacheError(f"{text_path}:{n}: not JSON ({str(e).splitlines()[0]})") from None
    encoded = [e.ids for e in tok.encode_batch(texts)] if texts else []
    lengths = np.array([len(e) for e in encoded if e], np.int64)
    tokens = np.fromiter((t for e in encoded for t in e), np.uint32, int(lengths.sum()))
    docs = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(1, np.int64)
    vocab = int(meta.get("vocab_size", tok.get_vocab_size()))
    return tokens, docs.astype(np.int64), Vocabulary.of_tokenizer(vocab, tok, tok_path)
