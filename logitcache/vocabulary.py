"""The classes of a token cache, described instead of listed.

A token cache's classes are the V token ids, named ``"0"`` .. ``"V-1"``. Listing them put
2.3 MB of JSON in the manifest at V = 262,144; the manifest's ``vocabulary`` entry says the same
in a few lines::

    "vocabulary": {"vocab_size": 262144, "sha256": "…", "tokenizer_sha256": "…"}

``sha256`` fingerprints the vocabulary: the size and, where a tokenizer is known, every id's token
string (so two tokenizers of one size differ); ``tokenizer_sha256`` is the tokenizer file's own
hash (informative: a re-saved file of the same vocabulary keeps ``sha256``). A
:class:`Vocabulary` is a read-only sequence of the id names, so readers that count, index or
compare classes work unchanged; two vocabularies are equal when their fingerprints are, and a
vocabulary equals a list of names when the list holds exactly its id names (a cache from before
this entry, which listed them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from logitcache.digest import file_sha256
from logitcache.errors import LogitCacheError


def fingerprint(vocab_size: int, tokens: dict[str, int] | None = None) -> str:
    """sha256 of the vocabulary: its size, and the token string of each id when ``tokens`` (a
    tokenizer's ``get_vocab()``, token -> id) is given."""
    doc = {"vocab_size": int(vocab_size),
           "tokens": None if tokens is None else [t for t, _ in sorted(tokens.items(), key=lambda x: x[1])]}
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class Vocabulary(Sequence):
    """V token ids as class names (``"0"`` .. ``"V-1"``), never materialised."""

    def __init__(self, vocab_size: int, sha256: str | None = None, tokenizer_sha256: str | None = None):
        self.size = int(vocab_size)
        self.sha256 = sha256 or fingerprint(self.size)
        self.tokenizer_sha256 = tokenizer_sha256

    @classmethod
    def of_tokenizer(cls, vocab_size: int, tokenizer, path: str | Path) -> "Vocabulary":
        """The vocabulary of a ``tokenizers.Tokenizer`` loaded from ``path``."""
        return cls(vocab_size, fingerprint(vocab_size, tokenizer.get_vocab()), file_sha256(path))

    @classmethod
    def from_entry(cls, entry, where: str = "manifest") -> "Vocabulary":
        """The manifest's ``vocabulary`` entry, checked (a damaged one is one error naming it)."""
        size = entry.get("vocab_size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not isinstance(sha, str):
            raise LogitCacheError(f"{where}: entry 'vocabulary' is {str(entry)[:80]!r}, not {{vocab_size, sha256}} "
                                  f"(edited or damaged)")
        return cls(size, sha, entry.get("tokenizer_sha256"))

    def describe(self) -> dict:
        """The manifest's ``vocabulary`` entry."""
        out = {"vocab_size": self.size, "sha256": self.sha256}
        if self.tokenizer_sha256:
            out["tokenizer_sha256"] = self.tokenizer_sha256
        return out

    def words(self) -> str:
        """How messages name it: ``V=50257 (vocabulary sha256 1a2b3c4d5e6f)``."""
        return f"V={self.size} (vocabulary sha256 {self.sha256[:12]})"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(j) for j in range(self.size)[i]]
        j = range(self.size)[i]  # IndexError past the end, negatives from the end
        return str(j)

    def __iter__(self):
        return map(str, range(self.size))

    def __eq__(self, other) -> bool:
        if isinstance(other, Vocabulary):
            return self.size == other.size and self.sha256 == other.sha256
        if isinstance(other, (list, tuple)):
            return len(other) == self.size and all(a == str(i) for i, a in enumerate(other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Vocabulary({self.words()})"


def words(classes) -> str:
    """How a message names a class list or vocabulary."""
    return classes.words() if isinstance(classes, Vocabulary) else f"C={len(classes)}"
