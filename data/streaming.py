"""Streaming a Parquet dataset into a training loop, for sets larger than a worker's memory.

Two ways to feed a loop, chosen per dataset by `data.loader` (:class:`LoaderKnobs`, a base of a method's data
section) once on the driver, so that every worker agrees:

    memory   the worker's whole Ray Data shard decoded into tensors once (TrainSession.load_shard), then shuffled
             mini-batches over it epoch after epoch (trainers/common.infinite_batches). Fast for small sets.
    stream   Ray Data reads the Parquet files block by block (`ray.data.read_parquet`), Ray Train splits them
             across the workers (`get_dataset_shard`, `streaming_split(equal=True)`) and each worker draws
             mini-batches from `iter_torch_batches(local_shuffle_buffer_size=...)`: memory is bounded by the
             shuffle buffer and Ray Data's block prefetch, not by the dataset.
    auto     stream when the decoded dataset per worker (uncompressed Parquet size from the file footers divided by
             the workers) exceeds `data.stream_threshold_mb`, else memory.

Epochs when streaming: each pass over the shard is one epoch; every worker gets the same number of rows (the split
is `equal`), so with `drop_last` every worker ends its epochs at the same step and the workers' DDP steps stay in
lock-step. A resumed run starts its epoch from the beginning (the position inside an epoch is not checkpointed).

In-process runs (run.num_workers=0) stream without Ray: :func:`stream_parquet` reads the part files record batch
by record batch through the same kind of local shuffle buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import numpy as np

from fabdistill.config import knob

LOADERS = ("auto", "memory", "stream")


@dataclasses.dataclass
class LoaderKnobs:
    """How a method's training data reach its loop; a method's data section inherits these knobs (`data.loader`)."""

    loader: str = knob("auto", choices=LOADERS,
                       help="memory: each worker decodes its whole shard into tensors once; stream: Ray Data "
                            "reads Parquet block by block with a local shuffle buffer (sets larger than a "
                            "worker's memory); auto: stream above stream_threshold_mb per worker")
    stream_threshold_mb: float = knob(2048.0, ge=0, le=10_000_000,
                                      help="auto: stream when the uncompressed Parquet size (file footers) "
                                           "divided by the workers exceeds this many MB")
    shuffle_buffer: int = knob(4096, ge=0, le=100_000_000,
                               help="stream: rows in each worker's local shuffle buffer (raised to the batch "
                                    "size; 0: no shuffling, rows in read order)")


def dataset_bytes(uri: str) -> int:
    """Uncompressed size of a Parquet dataset in bytes, from its files' footers (no data read)."""
    import pyarrow.parquet as pq

    from data.parquet_io import parquet_files

    fs, files = parquet_files(uri)
    total = 0
    for path in files:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


def resolve_loader(knobs: Any, uri: str, num_workers: int) -> str:
    """"memory" or "stream" for a dataset at `uri` trained on `num_workers` workers (0: in-process, one reader)."""
    loader = getattr(knobs, "loader", "memory")
    if loader not in LOADERS:
        raise ValueError(f"data.loader must be one of {LOADERS}, got {loader!r}")
    if loader != "auto":
        return loader
    per_worker_mb = dataset_bytes(uri) / max(1, num_workers) / 2**20
    return "stream" if per_worker_mb > knobs.stream_threshold_mb else "memory"


def shuffle_buffer_rows(shuffle_buffer: int, batch_size: int) -> Optional[int]:
    """Ray Data's `local_shuffle_buffer_size`: None (no shuffling) for 0, else at least one batch."""
    return None if shuffle_buffer <= 0 else max(int(shuffle_buffer), int(batch_size))


def stream_parquet(uri: str, batch_size: int, *, shuffle_buffer: int = 0, seed: int = 0,
                   drop_last: bool = True, columns: Optional[list[str]] = None) -> Iterator[dict[str, np.ndarray]]:
    """One epoch over a Parquet dataset in numpy batches (as Ray Data hands them over: fixed-size lists as object
    arrays of rows), read file by file and record batch by record batch: memory holds the shuffle buffer only.

    With `shuffle_buffer` > 0 the rows pass through a buffer of that many rows (at least one batch), shuffled with
    `seed`, the way `iter_torch_batches(local_shuffle_buffer_size=...)` does; the remainder is drained at the
    end. `drop_last` drops a last incomplete batch; `columns` reads only those."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.parquet_io import parquet_files

    fs, files = parquet_files(uri)
    rng = np.random.default_rng(seed)
    buffer_min = shuffle_buffer_rows(shuffle_buffer, batch_size) or 0
    pending: list[pa.Table] = []
    rows = 0

    def to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    def emit(final: bool) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pending, rows
        keep = 0 if final else buffer_min
        if not pending or (not final and rows < keep + batch_size):
            return
        table = pa.concat_tables(pending).combine_chunks() if len(pending) > 1 else pending[0]
        if buffer_min:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        start = 0
        while table.num_rows - start >= keep + batch_size:
            yield to_numpy(table.slice(start, batch_size))
            start += batch_size
        rest = table.slice(start)
        if final and rest.num_rows and not drop_last:
            yield to_numpy(rest)
            rest = rest.slice(rest.num_rows)
        pending, rows = ([rest] if rest.num_rows else []), rest.num_rows

    for path in files:
        with fs.open_input_file(path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=max(batch_size, 1024), columns=columns):
                part = pa.Table.from_batches([record_batch])
                pending.append(part)
                rows += part.num_rows
                yield from emit(final=False)
    yield from emit(final=True)


def numpy_collate(fn: Callable[[dict[str, np.ndarray]], Any]) -> Any:
    """`fn` as the collate_fn of Ray Data's `iter_torch_batches`, fed numpy batches (a NumpyBatchCollateFn;
    Ray calls it in its prefetch thread)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            return fn(batch)

    return _Collate()


def epochs(make_epoch: Callable[[int], Any], *, what: str = "dataset") -> Iterator[Any]:
    """Batches from `make_epoch(0)`, then `make_epoch(1)`, ... forever (a step-based loop's view of epochs)."""
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{what} gave no full batch in epoch {epoch} (fewer rows than one batch per worker?)")
        epoch += 1
