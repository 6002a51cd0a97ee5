"""The deterministic global-batch order that makes resume and 1-process == N-process runs agree.

Items are drawn from a sequence of epoch permutations of the dataset, each seeded by (seed, epoch):
global step s takes the global positions [s*B, (s+1)*B) of that sequence and rank r of W takes the
contiguous slice [r*B/W, (r+1)*B/W) of it. Every sample's seed is a function of (seed, step, position
in the global batch), so a sample's noise and augmentation do not depend on how many ranks share the
batch, nor on where a run was interrupted.
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 rounds), so nearby inputs give unrelated seeds."""
    x = 0x243F6A8885A308D3
    for v in values:
        x = (x ^ (v & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


class GlobalBatchSampler:
    """`local(step)` -> [(dataset index, sample seed), ...] for this rank's share of global step `step`."""

    def __init__(self, dataset_size: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} (the global batch) must divide by the "
                             f"{world_size} processes")
        self.size, self.batch, self.seed = dataset_size, global_batch, seed
        self.per_rank, self.rank = global_batch // world_size, rank
        self._epoch, self._order = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix64(self.seed, epoch, 1))
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order[offset]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        return [(self._index(step * self.batch + j), mix64(self.seed, step, j, 2)) for j in range(self.batch)]

    def local(self, step: int) -> list[tuple[int, int]]:
        start = step * self.batch + self.rank * self.per_rank
        return [(self._index(start + j), mix64(self.seed, step, self.rank * self.per_rank + j, 2))
                for j in range(self.per_rank)]


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: one list of (index, seed) per step from `start` to `stop`."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.sampler.local(step)

    def __len__(self):
        return max(self.stop - self.start, 0)


class SeededItems(torch.utils.data.Dataset):
    """Dataset view indexed by (index, seed): returns (item, seed) so collate can add `sample_seed`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        return self.dataset[index], seed


def seeded_collate(collate):
    def collate_with_seeds(pairs):
        items, seeds = zip(*pairs)
        batch = collate(list(items))
        if not isinstance(batch, dict):
            raise TypeError("a recipe's collate must return a dict")
        batch["sample_seed"] = torch.tensor(seeds, dtype=torch.int64)
        return batch
    return collate_with_seeds
