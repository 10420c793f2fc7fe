"""Chunked, resumable processing for the expensive stages (LLM calls).

A task gets its input as work units (:class:`pipeline.io.WorkUnit`: a pairs table's row group,
or a task's whole input for stages not keyed by pair), cuts each into fixed chunks (a unit's
rows are always the same, in the same order, so chunk ``c`` of unit ``u`` is always the same
rows) and writes each chunk's output as its own Parquet file, ``<unit key>_<chunk>.parquet``,
atomically. A re-run skips chunks whose file exists: a crash or a preemption costs at most the
chunk in flight, and no row is ever written twice.
"""

from __future__ import annotations

import abc
import os
from typing import Iterable, Iterator

import pyarrow as pa
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pipeline.atomic import remove_leftovers
from pipeline.engines.base import Engine
from pipeline.io import WorkUnit, write_table_atomic
from pipeline.progress import Progress


def chunk_name(key: str, chunk: int) -> str:
    return f"{key}_{chunk:05d}.parquet"


class ChunkedStep(PipelineStep, abc.ABC):
    """Subclasses implement :meth:`process` (a chunk of input rows -> output rows).

    Counters: what a chunk costs or yields (tokens, calls, statuses, engine time) goes through
    :meth:`count`, so it is stored in the chunk's own file and a card built from
    :func:`pipeline.io.chunk_stats` is right after any kill and resume. ``stat_update`` (the
    task's datatrove stats, lost with a killed task) is for per-task costs only, such as
    starting an engine.
    """

    def __init__(self, output_dir: str, schema: pa.Schema, chunk_size: int):
        super().__init__()
        self.output_dir = output_dir
        self.schema = schema
        self.chunk_size = chunk_size
        self.rank = 0  # the task running this step (set by run)
        self.unit = ""  # the key of the work unit whose chunk is in process()
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

    def run(self, data: Iterable[WorkUnit] | None, rank: int = 0, world_size: int = 1) -> Iterator:
        self.rank = rank
        progress = Progress(f"task {rank}: {self.name}", unit="rows", every_s=30)
        chunks = 0
        for work in data or ():
            self.unit = work.key
            for chunk, start in enumerate(range(0, len(work.rows), self.chunk_size)):
                path = os.path.join(self.output_dir, chunk_name(work.key, chunk))
                chunks += 1
                if os.path.exists(path):
                    self.stat_update("chunks_resumed")
                    continue
                self._chunk_stats: dict[str, float] = {}
                batch = work.rows[start : start + self.chunk_size]
                out = self.process(batch)
                write_table_atomic(path, out, self.schema, self._chunk_stats)
                remove_leftovers(path)  # of a killed attempt at this chunk
                self.stat_update("chunks_written")
                self.stat_update("rows_written", value=len(out))
                progress.update(len(batch))
        self.finish()
        logger.info(f"task {rank}: {chunks} chunks")
        yield from ()


class EngineStep(ChunkedStep):
    """A chunked step that calls an LLM engine, with one lifecycle for every such step.

    The engine is started by :meth:`start_engine` on the first use of :attr:`engine`, so a
    resumed task whose chunks are all written never pays for one; its start-up time
    (``Engine.start_s``) is recorded as the task stat ``engine_start_ms`` (a per-task cost, not
    a chunk's). :meth:`finish` closes it once the task's last chunk is written, so the next
    task in the same process can start its own (GPU memory).

    Subclasses implement :meth:`start_engine` and :meth:`process` (which uses ``self.engine``).
    A step that wraps the engine (a judge around it, say) builds the wrapper from
    ``self.engine`` on first use and lets this class own starting and closing it.
    """

    def __init__(self, output_dir: str, schema: pa.Schema, chunk_size: int):
        super().__init__(output_dir, schema, chunk_size)
        self._engine: Engine | None = None

    @abc.abstractmethod
    def start_engine(self) -> Engine:
        """Build and start this step's engine (called at most once per task)."""

    @property
    def engine(self) -> Engine:
        """The running engine, started on first use."""
        if self._engine is None:
            self._engine = self.start_engine()
            self.stat_update("engine_start_ms", value=int(self._engine.start_s * 1000))
        return self._engine

    def finish(self) -> None:
        """Close the engine, if this task started one."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
