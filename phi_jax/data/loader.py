"""The grain input pipeline: token shards -> fixed windows or packed rows -> shuffle -> process slice -> batches.

Every example is a dict of [seq_len] arrays: `inputs`, `targets`, `segment_ids`, `positions` (int32) and `loss_mask`
(float32). The pipeline is a MapDataset until batching, so a position in it is one number: the global batches already
consumed, which is the training step. Resuming slices the batches from there (`start_batch`), for any process count:
global batch k is always examples [k*B, (k+1)*B) of one global order, however the processes split it.
"""

from __future__ import annotations

import logging
import os

import grain
import numpy as np

from phi_jax.data.mixture import Interleave, integer_proportions
from phi_jax.data.shards import SplitReader, read_metadata

log = logging.getLogger("phi_jax")

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _example(row: np.ndarray, seg: np.ndarray, pos: np.ndarray,
             target: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """An example from a row of seq_len+1 tokens; a target counts only within the same (non-padding) segment, and
    with `target` (SFT: 1 where a token is a target) only where the predicted token is one."""
    mask = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    if target is not None:
        mask &= target[1:] > 0
    return {"inputs": row[:-1], "targets": row[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
            "loss_mask": mask.astype(np.float32)}


class Windows:
    """Window i = stream[i*seq_len : i*seq_len + seq_len + 1] of the documents joined (each ends with eos).

    Consecutive windows share one token, so every token but the first is a target exactly once.
    """

    def __init__(self, reader: SplitReader, seq_len: int):
        self.reader, self.seq_len = reader, seq_len
        self._n = max(0, (reader.num_tokens - 1) // seq_len)
        self._seg = np.ones(seq_len + 1, np.int32)
        self._pos = np.arange(seq_len + 1, dtype=np.int32)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        start = int(i) * self.seq_len
        return _example(self.reader.tokens(start, start + self.seq_len + 1), self._seg, self._pos)


_BLOCK = 1 << 22  # documents per vectorized block: bounds the temporaries whatever the corpus size


def _chunks(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: its chunk count ceil((L-1)/seq_len) (0 for a 1-token document), its last chunk's length
    (`width` for a 1-token document) and whether that last chunk is shorter than a row."""
    lengths = lengths.astype(np.int64)
    n_chunks = np.maximum(lengths - 2, -1) // seq_len + 1
    last_len = lengths - (n_chunks - 1) * seq_len
    return n_chunks, last_len, last_len < seq_len + 1


def pack_plan(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy (next-fit, document order) packing of documents into rows of seq_len+1 token slots, in numpy.

    A document longer than seq_len+1 is cut into chunks of seq_len+1 that overlap by one token (no target is lost);
    each such full chunk is a row of its own, and the shorter pieces fill shared rows in order: a new row starts
    when the next piece does not fit. A 1-token remainder has no target (it is the previous chunk's last target).
    Returns (row_ptr, chunk_doc, chunk_start, chunk_len): row r holds chunks row_ptr[r]:row_ptr[r+1]; full rows
    come first, then the shared ones. Three vectorized passes over blocks of documents; peak memory ~20 bytes
    per document beyond the lengths (tools/bench_packing.py).
    """
    width, n = seq_len + 1, len(lengths)
    index = np.int32 if n < 2**31 and (n == 0 or int(np.max(lengths)) < 2**31) else np.int64
    n_full = n_part = 0
    for lo in range(0, n, _BLOCK):  # pass 1: counts, so that every output is allocated once, exactly
        n_chunks, _, partial = _chunks(lengths[lo:lo + _BLOCK], seq_len)
        n_part += int(partial.sum())
        n_full += int(n_chunks.sum()) - int(partial.sum())
    length = np.full(n_full + n_part, width, index)  # full chunks in [0, n_full), shared pieces after them
    at = n_full
    for lo in range(0, n, _BLOCK):  # pass 2: the shared pieces' lengths, then their rows
        _, last_len, partial = _chunks(lengths[lo:lo + _BLOCK], seq_len)
        length[at:at + int(partial.sum())] = last_len[partial]
        at += int(partial.sum())
    starts = _next_fit_starts(length[n_full:], width)
    row_ptr = np.empty(n_full + len(starts), index if n_full + n_part < 2**31 else np.int64)
    row_ptr[:n_full] = np.arange(n_full)
    row_ptr[n_full:] = starts + n_full
    del starts
    doc, start = np.empty(n_full + n_part, index), np.empty(n_full + n_part, index)
    at_full, at_part = 0, n_full
    for lo in range(0, n, _BLOCK):  # pass 3: each chunk's document and offset (after the peak of pass 2)
        n_chunks, _, partial = _chunks(lengths[lo:lo + _BLOCK], seq_len)
        full = n_chunks - partial
        k = int(full.sum())
        doc[at_full:at_full + k] = np.repeat(np.arange(lo, lo + len(full), dtype=index), full)
        first = np.repeat(np.cumsum(full) - full, full)  # each full chunk's document's first full chunk
        start[at_full:at_full + k] = (np.arange(k) - first) * seq_len
        at_full += k
        k = int(partial.sum())
        doc[at_part:at_part + k] = np.flatnonzero(partial) + lo
        start[at_part:at_part + k] = (n_chunks[partial] - 1) * seq_len
        at_part += k
    return row_ptr, doc, start, length


def _next_fit_starts(sizes: np.ndarray, width: int) -> np.ndarray:
    """Where each next-fit row starts (indices into `sizes`, each in [2, width]), then len(sizes).

    A row starting at item i ends before f(i), the first item that would overflow it; the row starts are the orbit
    0, f(0), f(f(0)), ... It is found by pointer doubling: with F = f^(2^k), the first 2^(k+1) orbit points are the
    first 2^k and their images under F, so ~log2(rows) numpy gathers over the items replace a loop over rows.
    """
    n = len(sizes)
    step = np.empty(n + 1, np.int32 if n < 2**31 else np.int64)
    reach = width // 2 + 1  # a row holds at most width // 2 items (each has >= 2 tokens)
    for lo in range(0, n + 1, _BLOCK):  # f by binary search in block-local prefix sums
        hi = min(n, lo + _BLOCK + reach)
        ends = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(sizes[lo:hi], out=ends[1:])
        queries = ends[:min(_BLOCK, n + 1 - lo)] + width
        step[lo:lo + len(queries)] = lo + np.searchsorted(ends, queries, side="right") - 1
    orbit = np.zeros(1, step.dtype)
    while orbit[-1] != n:
        images = step[orbit]  # increasing until they reach n, then n repeated
        images = images[images > orbit[-1]]
        orbit = np.concatenate([orbit, images[:np.searchsorted(images, n) + 1]])
        if orbit[-1] != n:
            step = step[step]
    return orbit


class PackedRows:
    """Row r: its documents (or chunks) back to back with segment ids 1.., positions from 0, padding segment 0."""

    def __init__(self, reader: SplitReader, seq_len: int):
        self.reader, self.seq_len = reader, seq_len
        self.row_ptr, self.doc, self.start, self.len = pack_plan(reader.lengths, seq_len)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        if not 0 <= r < len(self):
            raise IndexError(r)
        width = self.seq_len + 1
        row, seg, pos = np.zeros(width, np.int32), np.zeros(width, np.int32), np.zeros(width, np.int32)
        offset = 0
        for k in range(self.row_ptr[r], self.row_ptr[r + 1]):
            begin = int(self.reader.offsets[self.doc[k]] + self.start[k])
            c = int(self.len[k])
            row[offset:offset + c] = self.reader.tokens(begin, begin + c)
            seg[offset:offset + c] = k - self.row_ptr[r] + 1
            pos[offset:offset + c] = np.arange(c)
            offset += c
        return _example(row, seg, pos)


class SftRows:
    """SFT examples packed whole: row r holds examples next-fit in order, back to back, with segment ids 1..,
    positions from 0 and their loss masks; an example never spans two rows. One longer than a row (seq_len + 1
    tokens) is truncated to it (its end is cut) and counted: `truncated`, logged once."""

    def __init__(self, reader: SplitReader, seq_len: int):
        self.reader, self.seq_len = reader, seq_len
        width = seq_len + 1
        self.len = np.minimum(reader.lengths, width)
        self.truncated = int((reader.lengths > width).sum())
        if self.truncated:
            log.warning("%d of %d %s examples are longer than seq_len + 1 = %d tokens: each is truncated to its "
                        "first %d (tools.prepare_data --seq_len=%d --strict refuses them instead)", self.truncated,
                        len(reader), reader.split, width, width, seq_len)
        self.row_ptr = _next_fit_starts(self.len, width) if len(self.len) else np.zeros(1, np.int64)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        if not 0 <= r < len(self):
            raise IndexError(r)
        width = self.seq_len + 1
        row, seg, pos = np.zeros(width, np.int32), np.zeros(width, np.int32), np.zeros(width, np.int32)
        target = np.zeros(width, np.uint8)
        offset = 0
        for k in range(int(self.row_ptr[r]), int(self.row_ptr[r + 1])):
            tokens, mask = self.reader.example(k)
            c = int(self.len[k])
            row[offset:offset + c], target[offset:offset + c] = tokens[:c], mask[:c]
            seg[offset:offset + c] = k - self.row_ptr[r] + 1
            pos[offset:offset + c] = np.arange(c)
            offset += c
        return _example(row, seg, pos, target)


def _examples(data_dir: str | os.PathLike, split: str, seq_len: int, packing: bool, batch_size: int):
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be positive.")
    reader = SplitReader(data_dir, split, read_metadata(data_dir))
    if reader.has_loss_mask:
        if not packing:
            raise ValueError(f"{data_dir} holds SFT examples (with a loss mask), which are packed whole into rows: "
                             "set --config.data.packing=True.")
        examples = SftRows(reader, seq_len)
    else:
        examples = PackedRows(reader, seq_len) if packing else Windows(reader, seq_len)
    if len(examples) < max(batch_size, 1):
        raise ValueError(f"The {split} split of {data_dir} has {reader.num_tokens} tokens: {len(examples)} "
                         f"{'packed rows' if packing else 'windows'} of {seq_len=}, fewer than one batch of "
                         f"{batch_size}. Use a smaller seq_len or batch size, or more data.")
    return examples


def make_dataset(data_dir: str | os.PathLike, *, split: str = "train", seq_len: int, global_batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1, packing: bool = False,
                 shuffle: bool = True, num_epochs: int | None = None, prefetch: bool = True,
                 start_batch: int = 0) -> grain.IterDataset:
    """This process's batches ([global_batch_size // process_count, seq_len] per key), deterministic in `seed`.

    The examples are shuffled globally (a fresh permutation each epoch), cut to a whole number of global batches,
    and process p takes every process_count-th one from p: the processes' batches at a step are disjoint and together
    form the single-process batch of that step (in another row order). `start_batch` skips that many global batches.
    """
    _check_batching(global_batch_size, process_index, process_count)
    examples = _examples(data_dir, split, seq_len, packing, global_batch_size)
    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed % 2**32)
    ds = ds[:len(examples) // global_batch_size * global_batch_size]
    ds = ds[process_index::process_count]
    ds = ds.repeat(num_epochs).batch(global_batch_size // process_count, drop_remainder=True)
    return ds[start_batch:].to_iter_dataset(_read_options(prefetch))


def _check_batching(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size % process_count:
        raise ValueError(f"{global_batch_size=} is not divisible by {process_count=}: choose a multiple.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must be in [0, {process_count=}).")


def _read_options(prefetch: bool) -> grain.ReadOptions:
    # Threads keep the order (and so the checkpointed state) deterministic; processes would not pay off here.
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4) if prefetch else grain.ReadOptions(num_threads=0)


def source_seed(seed: int, source: int) -> int:
    """Each source's own shuffle seed, so equal-sized sources are not shuffled alike."""
    return int(np.random.SeedSequence([seed % 2**32, source]).generate_state(1)[0])


def make_mixture_dataset(data_dirs: list[str | os.PathLike], weights: list[float], *, split: str = "train",
                         seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1, packing: bool = False, prefetch: bool = True,
                         start_batch: int = 0) -> grain.IterDataset:
    """This process's batches of a weighted mixture of shard directories (see phi_jax/data/mixture.py).

    Global example i is `Interleave(weights)[i]` of the sources, each shuffled on its own and repeated endlessly;
    process p takes every process_count-th example from p, as in `make_dataset`, from global batch `start_batch`.
    """
    _check_batching(global_batch_size, process_index, process_count)
    if len(data_dirs) != len(weights):
        raise ValueError(f"{len(data_dirs)} sources but {len(weights)} weights: give one weight per source.")
    parents = []
    for s, d in enumerate(data_dirs):
        examples = _examples(d, split, seq_len, packing, 1)
        parents.append(grain.MapDataset.source(examples).shuffle(source_seed(seed, s)))
    ds = grain.MapDataset.select_from_datasets(parents, Interleave(integer_proportions(weights)))
    ds = ds[process_index::process_count].batch(global_batch_size // process_count, drop_remainder=True)
    return ds[start_batch:].to_iter_dataset(_read_options(prefetch))


def make_eval_batches(data_dir: str | os.PathLike, *, seq_len: int, batch_size: int, max_batches: int,
                      split: str = "val") -> list[dict[str, np.ndarray]]:
    """The first `max_batches` batches of consecutive windows of the validation split (fewer if it is short); SFT
    shards give their packed rows (SftRows) in order."""
    packing = SplitReader(data_dir, split).has_loss_mask  # SFT examples are always packed whole
    examples = _examples(data_dir, split, seq_len, packing, batch_size)
    n = min(max_batches, len(examples) // batch_size)
    return [{k: np.stack([examples[b * batch_size + i][k] for i in range(batch_size)]) for k in KEYS}
            for b in range(n)]
