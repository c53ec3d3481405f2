"""`sample_packing`: several tokenized rows per training example, without cross-row leakage.

Rows are assigned to bins of `sequence_len` tokens by best-fit decreasing (within 11/9 of the
optimal bin count), then concatenated. Each packed example carries `position_ids` that restart
at 0 for every row: transformers (5.x `masking_utils.find_packed_sequence_indices`) turns those
into a block-diagonal causal mask for sdpa/eager/flex when no `attention_mask` is passed, and
flash-attention uses them for varlen. The first label of every row is -100 so the shifted loss
never trains a row's last token to predict the next row's first token.

The gathering is vectorised with numpy over the Arrow columns, so packing 100k rows takes a
fraction of a second instead of a Python loop per token.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

from dft_peft.data.report import PackingReport
from dft_peft.data.tokenize import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "labels", "weights")


def plan_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices per bin, each bin's lengths summing to at most `capacity` (best-fit decreasing).

    Rows keep their original order inside a bin and bins are ordered by their first row, so the
    result depends only on the lengths (reproducible across runs and machines).
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"row {i} has {need} tokens, more than the bin capacity {capacity}")
        slot = bisect_left(free, (need, -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - need > 0:
            insort(free, (remaining - need, b))
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def pack_dataset(ds, sequence_len: int):
    """Pack a tokenized dataset into bins of `sequence_len`; returns (dataset, PackingReport)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # applies any select/shuffle indices
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = plan_bins(lengths.tolist(), sequence_len)
    report = PackingReport(
        rows=len(lengths), bins=len(bins), tokens=int(lengths.sum()), capacity=len(bins) * sequence_len
    )

    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    total = int(lengths.sum())
    index_type = np.int32 if total < 2**31 else np.int64  # halves memory traffic on big datasets
    src_starts = (np.cumsum(lengths) - lengths).astype(index_type)
    out_lengths = lengths[order]
    out_starts = (np.cumsum(out_lengths) - out_lengths).astype(index_type)
    # Position of every output token inside its row, and where to read it from in the input.
    within = np.arange(total, dtype=index_type)
    within -= np.repeat(out_starts, out_lengths)
    gather = np.repeat(src_starts[order], out_lengths)
    gather += within
    bin_sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    bin_offsets = np.concatenate([[0], np.cumsum(out_lengths)[np.cumsum(bin_sizes) - 1]]).astype(index_type)
    list_array = pa.ListArray if index_type == np.int32 else pa.LargeListArray  # 32-bit offsets cap at 2**31

    columns: dict[str, pa.Array] = {}
    for name in PACKED_COLUMNS:
        if name not in table.column_names:
            continue
        values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)[gather]
        if name == "labels":
            values[out_starts] = IGNORE_INDEX  # fancy indexing above made a copy: safe to edit
        columns[name] = list_array.from_arrays(pa.array(bin_offsets), pa.array(values))
    positions = within.astype(np.int32, copy=False)  # < sequence_len
    columns["position_ids"] = list_array.from_arrays(pa.array(bin_offsets), pa.array(positions))
    # An explicit fingerprint: otherwise datasets hashes the whole table (seconds per 100k rows).
    fingerprint = hashlib.sha256(f"{ds._fingerprint}-packed-{sequence_len}".encode()).hexdigest()[:32]
    packed = datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)), fingerprint=fingerprint)
    return packed, report
