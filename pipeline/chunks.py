"""Chunked, resumable processing for the expensive stages (LLM calls).

A task cuts its input into fixed chunks (the input order of a task is deterministic, so chunk
``c`` of task ``r`` is always the same rows) and writes each chunk's output as its own Parquet
file, atomically. A re-run skips chunks whose file exists: a crash or a preemption costs at
most the chunk in flight, and no row is ever written twice.
"""

from __future__ import annotations

import abc
import glob
import os
from itertools import islice
from typing import Iterable, Iterator

import pyarrow as pa
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pipeline.io import write_table_atomic
from pipeline.progress import Progress


def chunk_name(rank: int, chunk: int) -> str:
    return f"{rank:05d}_{chunk:05d}.parquet"


class ChunkedStep(PipelineStep, abc.ABC):
    """Subclasses implement :meth:`process` (a chunk of input rows -> output rows)."""

    def __init__(self, output_dir: str, schema: pa.Schema, chunk_size: int):
        super().__init__()
        self.output_dir = output_dir
        self.schema = schema
        self.chunk_size = chunk_size
        self._chunk_stats: dict[str, float] = {}

    @abc.abstractmethod
    def process(self, rows: list[dict]) -> list[dict]:
        """Output rows for one chunk of input rows; must not raise for one bad row."""

    def finish(self) -> None:
        """Called once the task's last chunk is written (release engines here)."""

    def count(self, name: str, value: float = 1) -> None:
        """A counter of the chunk in progress: kept in the chunk file (see ``io.chunk_stats``)
        and in the task's datatrove stats."""
        self._chunk_stats[name] = self._chunk_stats.get(name, 0) + value
        self.stat_update(name, value=value)

    def run(self, data: Iterable[dict] | None, rank: int = 0, world_size: int = 1) -> Iterator:
        rows = iter(data or ())
        progress = Progress(f"task {rank}: {self.name}", unit="rows", every_s=30)
        chunk = 0
        while batch := list(islice(rows, self.chunk_size)):
            path = os.path.join(self.output_dir, chunk_name(rank, chunk))
            chunk += 1
            if os.path.exists(path):
                self.stat_update("chunks_resumed")
                continue
            self._chunk_stats: dict[str, float] = {}
            out = self.process(batch)
            write_table_atomic(path, out, self.schema, self._chunk_stats)
            for stale in glob.glob(os.path.join(self.output_dir, f".{chunk_name(rank, chunk - 1)}.*.tmp")):
                os.remove(stale)  # left by a killed attempt at this chunk
            self.stat_update("chunks_written")
            self.stat_update("rows_written", value=len(out))
            progress.update(len(batch))
        self.finish()
        logger.info(f"task {rank}: {chunk} chunks")
        yield from ()
