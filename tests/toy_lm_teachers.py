"""Tiny LM teachers for tests/test_tokens.py: ``module:callable`` factories taking the corpus's
vocabulary and context (``teacher_args``), each with its own fixed seed."""

import torch

from logitcache.models import gpt_tiny


def gpt_a(vocab_size: int, context: int) -> torch.nn.Module:
    return gpt_tiny(vocab_size, context, dim=16, depth=2, heads=2, seed=1)


def gpt_b(vocab_size: int, context: int) -> torch.nn.Module:
    return gpt_tiny(vocab_size, context, dim=8, depth=1, heads=1, seed=2)


class Synthetic(torch.nn.Module):
    """Logits from a fixed random table indexed by (token, position): any V at almost no cost."""

    def __init__(self, vocab_size: int, context: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(16, vocab_size, generator=g) * 3)
        self.register_buffer("emb", torch.randn(4096, 16, generator=g))
        self.vocab_size = vocab_size

    def forward(self, ids):
        return self.emb[ids % 4096] @ self.proj


def synthetic(vocab_size: int, context: int) -> torch.nn.Module:
    return Synthetic(vocab_size, context).eval()


def gpt_v60(context: int) -> torch.nn.Module:
    """A teacher of another vocabulary (60 ids)."""
    return gpt_tiny(60, context, dim=8, depth=1, heads=1, seed=3)
