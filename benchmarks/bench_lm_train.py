"""LM training step from a token cache against the next-token-label step on the same windows.

A nanoGPT corpus at V = 151,936 (uint32 ids; --quick: V = 32,768) cut into windows of L = 128
tokens, and a token cache of it (compact, top-64, one epoch; synthetic next-token teacher rows
written through the real CacheWriter, see benchmarks/_lm_cache.py). The same student,
``gpt_tiny`` (4 layers of width 128, 4 heads; --quick 2 x 64), from the same initial weights,
trains with AdamW, batch 4 windows, in one process (no DataLoader workers), two ways:

  labels  the windows replayed from the cache's stored order and offsets (ids, next tokens,
          mask: what a next-token run reads; no targets) -> forward -> cross-entropy on the
          unmasked positions -> backward -> optimiser step
  cache   CacheStream (the same windows + their stored targets, read and decoded) ->
          ``logitcache.train.distill_step``: forward -> per-token masked KD with the exact tail
          bucket, temperature 2 applied now (what ``logitcache train`` runs on a token cache,
          --alpha 0) -> backward -> optimiser step

A step's time includes fetching its batch. Rounds are interleaved (each round runs --steps steps
of one pipeline, then of the other, the order alternating), the ratio is taken per round
(median step of cache / median step of labels) and its median reported; CPU time per step
(this process) too. Goal: cache / labels <= 1.05.

    python benchmarks/bench_lm_train.py            # ~3.5 min of CPU (10 min wall on a busy 2-core box)
    python benchmarks/bench_lm_train.py --quick    # ~15 s of CPU (1 min wall on a busy box)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _lm_cache  # noqa: E402

L, BATCH, TOPK, TEMPERATURE = 128, 4, 64, 2.0


class LabelWindows:
    """The cache's windows without its targets: (tokens, next tokens, mask) per batch, replayed
    from the source exactly as CacheStream replays them."""

    def __init__(self, cache: Path, corpus: Path):
        from logitcache import open_cache
        from logitcache.augment import Augmenter
        from logitcache.sources import open_source
        from logitcache.views import ViewSource

        with open_cache(cache) as c:
            self.order = c.order(0)
            self.offset = c.read_block(0, 0, c.num_samples, targets=False)["params/window.offset"]
            spec = c.manifest["augment"]
        self.source = ViewSource(open_source(corpus), Augmenter.from_spec(spec))

    def __iter__(self):
        for a in range(0, len(self.order), BATCH):
            windows = [self.source.replay_tokens(i, {"window.offset": o})
                       for i, o in zip(self.order[a:a + BATCH].tolist(), self.offset[a:a + BATCH])]
            ids, nxt, mask = (torch.stack(x) for x in zip(*windows))
            yield {"tokens": ids, "labels": nxt, "mask": mask}


def label_step(model, opt, batch) -> float:
    from logitcache.lm import next_token_loss

    z = model(batch["tokens"])
    m = batch["mask"]
    loss = next_token_loss(z[m], batch["labels"][m])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> None:
    args = C.parser(__doc__)
    args.add_argument("--vocab", type=int, default=None, help="V (default 151,936; quick 32,768)")
    args.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6; quick 3)")
    args.add_argument("--steps", type=int, default=None, help="steps per pipeline per round (default 4; quick 3)")
    a = args.parse_args()
    torch.set_num_threads(a.threads or 1)
    from logitcache import open_cache
    from logitcache.models import gpt_tiny
    from logitcache.train import distill_step, make_optimizer
    from logitcache.views import CacheStream

    V = a.vocab or (32_768 if a.quick else 151_936)
    dim, depth, heads = (64, 2, 2) if a.quick else (128, 4, 4)
    rounds, steps = a.rounds or (3 if a.quick else 6), a.steps or (3 if a.quick else 4)
    windows = (rounds * steps + 2) * BATCH
    work = C.workdir(a.workdir)
    print(f"# machine: {C.machine()}")
    corpus = _lm_cache.make_corpus(work / f"corpus_V{V}", windows * L + 1, V, L)
    cache = _lm_cache.make_cache(work / f"compact_V{V}_k{TOPK}.zarr", corpus, k=TOPK, pool=512)
    codec = open_cache(cache).codec
    models = {p: gpt_tiny(V, L, dim, depth, heads, seed=0).train() for p in ("labels", "cache")}
    opts = {p: make_optimizer(m, 1e-3, 0.01, rounds * steps)[0] for p, m in models.items()}
    params = sum(p.numel() for p in models["labels"].parameters())
    print(f"# student gpt_tiny {depth}x{dim} ({params / 1e6:.1f}M parameters), V = {V:,}, L = {L}, batch {BATCH}, "
          f"cache compact top-{TOPK}, T = {TEMPERATURE}")
    feeds = {"labels": iter(LabelWindows(cache, corpus)),
             "cache": iter(CacheStream(cache, corpus, epoch=0, batch_size=BATCH, read_ahead=0))}
    dev = torch.device("cpu")
    run = {"labels": lambda b: label_step(models["labels"], opts["labels"], b),
           "cache": lambda b: distill_step(models["cache"], opts["cache"], b, "multiclass", dev,
                                           temperature=TEMPERATURE, codec=codec)}
    for p in run:  # warm-up: the first step allocates
        run[p](next(feeds[p]))
    wall = {p: [] for p in run}
    cpu = {p: [] for p in run}
    ratios = []
    for r in range(rounds):
        order = ["labels", "cache"] if r % 2 == 0 else ["cache", "labels"]
        med = {}
        for p in order:
            w, c = [], []
            for _ in range(steps):
                t, c0 = time.perf_counter(), time.process_time()
                run[p](next(feeds[p]))
                w.append(time.perf_counter() - t)
                c.append(time.process_time() - c0)
            wall[p] += w
            cpu[p] += c
            med[p] = C.median(w)
        ratios.append(med["cache"] / med["labels"])
    rows = [[p, round(1e3 * C.median(wall[p]), 1), round(C.median(wall[p]) / C.median(wall["labels"]), 3),
             round(1e3 * C.median(cpu[p]), 1), round(C.median(cpu[p]) / C.median(cpu["labels"]), 3)] for p in run]
    print(C.table(["pipeline", "ms/step", "/ labels", "CPU ms/step", "CPU / labels"], rows))
    print(f"ratios: cache/labels step {C.median(ratios):.3f} (median of {rounds} rounds, "
          f"{min(ratios):.3f}-{max(ratios):.3f}; goal <= 1.05); CPU {C.median(cpu['cache']) / C.median(cpu['labels']):.3f}")


if __name__ == "__main__":
    main()
