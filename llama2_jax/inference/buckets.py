"""The static shapes of the device stepper (llama2_jax.inference.slots): which lengths and row
counts its steps compile for, how its KV cache is cut into row groups and position blocks, and
which steps a warm-up compiles. Plain arithmetic (no JAX), shared by the Slots and the memory
planner, so the two cannot disagree.

  prefill  one compile per (chunk bucket, attend bucket) over the one-row staging cache;
  decode   one per (row bucket, attend bucket): the rows are the leading row groups up to the
           highest slot in use, the attend length that of the longest sequence in use;
  commit / extract / insert   one per number of position blocks.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# (row groups) x (position blocks) pairs a cache may have: each pair is a few kernels per
# layer in every compiled step, and XLA:CPU maps memory for each kernel (64 slots in 7 groups
# x 5 blocks of BENCH_134M exceeded Linux's default 65530 memory maps).
MAX_PIECES = 16


def group_sizes(rows: int, growth: int = 4) -> tuple[int, ...]:
    """Row groups for `rows` rows whose leading groups hold 1, growth, growth^2, ... rows in
    all (the last group cut to fit): 1, 3, 12, 48, ... for growth 4."""
    sizes, total = [], 0
    while total < rows:
        size = min(max(1, total * (growth - 1)), rows - total)
        sizes.append(size)
        total += size
    return tuple(sizes)


def block_sizes(length: int, block: int) -> tuple[int, ...]:
    """Position blocks of `block` slots covering `length` (the last one shorter)."""
    return tuple(min(block, length - off) for off in range(0, length, block))


def default_kv_block(length: int, groups: int = 1, backend: str = "cpu") -> int:
    """Positions per block of a KV cache of `length` in `groups` row groups: from 128 on CPU
    (512 on accelerators, where each block costs kernel launches: not measured there yet),
    doubled until groups x blocks <= MAX_PIECES (and at most 4 blocks with several groups)."""
    block = 128 if backend == "cpu" else 512
    most = max(1, min(MAX_PIECES // max(groups, 1), 4 if groups > 1 else MAX_PIECES))
    while length > most * block:
        block *= 2
    return min(block, pow2_at_least(length, 1))


def pow2_at_least(n: int, low: int) -> int:
    size = low
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The bucket arithmetic of `max_slots` slots of `length` positions.

    chunk: the longest prefill call; min_bucket: the smallest prefill bucket; kv_block:
    positions per cache block (a power of two; the smallest attend length); row_growth:
    decode steps compute 1, row_growth, row_growth^2, ... rows (the cache's row groups).
    """

    max_slots: int
    length: int
    chunk: int = 256
    min_bucket: int = 16
    kv_block: int = 128
    row_growth: int = 4

    def __post_init__(self):
        if self.max_slots < 1 or self.chunk < 1 or self.length < 1:
            raise ValueError(f"max_slots ({self.max_slots}), length ({self.length}) and chunk "
                             f"({self.chunk}) must be >= 1")
        if self.kv_block < 1 or self.kv_block & (self.kv_block - 1):
            raise ValueError(f"kv_block={self.kv_block} must be a power of two")
        if self.row_growth < 2:
            raise ValueError(f"row_growth={self.row_growth} must be >= 2")

    @classmethod
    def make(cls, max_slots: int, length: int, *, chunk: int = 256, min_bucket: int = 16,
             kv_block: int | None = None, row_growth: int = 4, backend: str = "cpu"):
        """Shapes with kv_block None chosen by default_kv_block for `backend`."""
        if kv_block is None:
            kv_block = default_kv_block(length, len(group_sizes(max_slots, row_growth)),
                                        backend)
        # kv_block stays a power of two (the last block of a length that is not one is shorter)
        return cls(max_slots, length, min(chunk, length), min_bucket,
                   min(kv_block, pow2_at_least(length, 1)), row_growth)

    # -- the cache's pieces ------------------------------------------------------------------
    @property
    def groups(self) -> tuple[int, ...]:
        return group_sizes(self.max_slots, self.row_growth)

    @property
    def blocks(self) -> tuple[int, ...]:
        return block_sizes(self.length, self.kv_block)

    def blocks_for(self, n: int) -> int:
        """Position blocks that hold positions 0..n-1."""
        return next(j + 1 for j, end in enumerate(itertools.accumulate(self.blocks)) if end >= n)

    # -- buckets -----------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The static length a prefill of n tokens compiles for: a power of two up to
        4 x min_bucket, then a multiple of that (less padding than powers of two: a prompt's
        last chunk is any length), capped at the chunk."""
        step = 4 * self.min_bucket
        if n > step:
            return min(-(-n // step) * step, self.chunk)
        return min(pow2_at_least(n, self.min_bucket), self.length, self.chunk)

    def attend_bucket(self, n: int) -> int:
        """Positions a step that needs n of them reads: kv_block x a power of two, or all."""
        return min(pow2_at_least(n, self.kv_block), self.length)

    def attend_buckets(self) -> list[int]:
        out = [self.attend_bucket(1)]
        while out[-1] < self.length:
            out.append(self.attend_bucket(out[-1] + 1))
        return out

    def chunk_buckets(self) -> list[int]:
        out = [self.bucket(1)]
        while out[-1] < self.chunk:
            out.append(self.bucket(out[-1] + 1))
        return out

    def row_buckets(self) -> list[int]:
        """Rows a decode step may compute: the leading row groups, 1, 4, 16, ..., max_slots."""
        return list(itertools.accumulate(self.groups))

    def row_bucket(self, n: int) -> int:
        return next(r for r in self.row_buckets() if r >= n)

    def decode_shape(self, positions: np.ndarray) -> tuple[int, int]:
        """(rows, attend) of a decode step over slots at `positions` [max_slots] (`length`:
        idle): the row bucket of the highest slot in use, the attend bucket of the longest."""
        live = np.flatnonzero(positions < self.length)
        if not live.size:
            return self.row_bucket(1), self.attend_bucket(1)
        return (self.row_bucket(int(live[-1]) + 1),
                self.attend_bucket(int(positions[live].max()) + 1))

    # -- warm-up -----------------------------------------------------------------------------
    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(tokens, start) of one prefill per compiled (chunk bucket, attend bucket) pair."""
        out = []
        for t in self.chunk_buckets():
            for attend in self.attend_buckets():
                n = min(t, attend, self.length - 1)
                start = max(0, min(attend, self.length - 1) - n)
                if self.bucket(n) == t and self.attend_bucket(start + n) == attend:
                    out.append((n, start))
        return out

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(rows, attend) of every decode step."""
        return [(r, a) for r in self.row_buckets() for a in self.attend_buckets()]

    def compiled_steps(self, shared_stage: bool = False, score: bool = False) -> int:
        """How many steps a warm-up compiles: the prefills (twice with `score`: those that
        return every position's logits too), a commit, an extract and an insert per number
        of position blocks (no commit where the staging row is the slot's own), the
        decodes."""
        per_block = (2 if shared_stage else 3) * len(self.blocks)
        prefills = len(self.prefill_shapes()) * (2 if score else 1)
        return prefills + per_block + len(self.decode_shapes())
