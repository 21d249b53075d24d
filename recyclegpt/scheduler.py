"""Continuous batching: requests decoded together on one engine, joining and leaving between cycles.

The server (``server.py``) hands every request to a ``Scheduler``. One thread runs the engine (which
is not thread-safe). Between cycles it admits waiting requests, oldest first, while the running rows
number fewer than ``max_batch``: each joins the running ``generate.Batch`` of its kind, prefilled in
one call with the others admitted beside it. Then it runs one cycle of a batch (in turn, when kinds
differ), hands each row's new text to its request, and lets finished and abandoned rows leave, which
frees their places for the next waiting requests. Requests wait in a bounded queue; a full queue
refuses new ones (``QueueFull``).

Requests share a batch when they decode alike: the same strategy and settings and the same sampling
settings (every greedy request with the same penalty shares one; a seeded sampled request gets a
batch of its own, so that its draws are its own and repeat with its seed). Each row keeps its own
length, accepted drafts, stop strings, token budget and counters (``generate.Batch``): greedy rows
decode as they would alone (the same products and attention up to rounding in the last bit, see
docs/serving.md); sampled rows are drawn from the same distribution as alone (verified decoding stays
exact per row), not with the same draws.

With ``max_batch`` 1 the scheduler is the serial server: one request at a time, in arrival order.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from recyclegpt.generate import Batch, DecodeStats, Engine, TextStream
from recyclegpt.sampling import SamplingConfig
from recyclegpt.strategies import Strategy

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scheduler's waiting queue is full: the request was not taken (retry later)."""


@dataclass(eq=False)
class Job:
    """One prompt of a request: what to decode and where its output goes.

    ``post`` is called on the engine thread with ``("text", chunk)`` as text is decoded, then
    ``("done", DecodeStats)`` (the row's own counters) when the row ends, or ``("error", exception)``.
    ``cancel()`` (a client gone) makes the row leave before the next cycle; nothing more is posted.
    """

    prompt: list[int]
    strategy: Strategy
    sampling: SamplingConfig
    max_new_tokens: int
    stop: Sequence[str]
    post: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: TextStream | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def kind(self) -> tuple:
        """What jobs must share to share a batch (see the module's docstring)."""
        s, cfg = self.strategy, self.sampling
        drafter = s.drafter
        if isinstance(drafter, functools.partial):  # a factory with settings (speed's): equal settings share
            drafter = (drafter.func, drafter.args, tuple(sorted(drafter.keywords.items())))
        elif callable(drafter):
            drafter = id(drafter)
        strategy = (s.name, getattr(s, "k", None), s.width, getattr(s, "threshold", None), drafter)
        if cfg.greedy:
            return strategy, replace(cfg, seed=None)
        return strategy, (id(self) if cfg.seed is not None else cfg)


class Scheduler:
    """Runs ``engine`` for many requests at once on a thread of its own (see the module's docstring).

    Args:
        engine: the engine; only this scheduler's thread calls it.
        max_batch: the most rows decoded at once, over all batches (1: one request at a time).
        max_waiting: the most prompts waiting for a place; ``submit`` refuses more.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_waiting: int = 64) -> None:
        if max_batch < 1 or max_waiting < 1:
            raise ValueError(f"max_batch and max_waiting must be >= 1, got {max_batch} and {max_waiting}")
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self.batches: dict[tuple, Batch] = {}
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._turn = 0
        self._thread = threading.Thread(target=self._run, name="recyclegpt-engine", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        """Rows decoding now, over all batches."""
        return sum(len(b.rows) for b in list(self.batches.values()))

    @property
    def waiting(self) -> int:
        """Prompts waiting for a place."""
        return len(self._waiting)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue a request's jobs (all or none).

        Raises:
            QueueFull: fewer than ``len(jobs)`` places are left in the queue.
        """
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self._waiting)} prompts are waiting, the most it queues "
                                f"is {self.max_waiting}; retry later")
            self._waiting.extend(jobs)
            self._cv.notify()

    def close(self) -> None:
        """Stop the thread after its current cycle; jobs not finished get an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self.batches):
                    self._cv.wait()
                if self._closed:
                    break
                admitted = self._admit()
            for kind, jobs in admitted.items():
                self._start(kind, jobs)
            if self.batches:
                kinds = list(self.batches)
                self._turn = (self._turn + 1) % len(kinds)
                self._cycle(kinds[self._turn])
        gone = RuntimeError("the server shut down before this request finished")
        for job in [*self._waiting, *(row.key for b in self.batches.values() for row in b.rows)]:
            job.post(("error", gone))

    def _admit(self) -> dict[tuple, list[Job]]:
        """Take waiting jobs, oldest first, while places are free; grouped by kind."""
        free, out = self.max_batch - self.rows, {}
        while self._waiting and free > 0:
            job = self._waiting.popleft()
            if not job.cancelled.is_set():
                out.setdefault(job.kind, []).append(job)
                free -= 1
        return out

    def _start(self, kind: tuple, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and add them to the batch of their kind (a new one if none runs)."""
        batch = self.batches.get(kind) or self.engine.batch(jobs[0].strategy, jobs[0].sampling)
        try:
            first = batch.add([j.prompt for j in jobs], [j.max_new_tokens for j in jobs],
                              [self.engine.stop_check(j.stop) for j in jobs], jobs)
        except Exception as exc:  # e.g. out of memory: these requests fail, the others go on
            logger.exception("prefill failed")
            for job in jobs:
                job.post(("error", exc))
            return
        self.batches[kind] = batch
        for job, ids in zip(jobs, first, strict=True):
            job.text = TextStream(self.engine.tokenizer, job.stop)
            self._send(job, ids)
        self._retire(kind)

    def _cycle(self, kind: tuple) -> None:
        """One cycle of a batch; its rows' text goes to their requests."""
        batch = self.batches[kind]
        try:
            added = batch.step()
        except Exception as exc:  # the batch's requests fail, the server goes on
            logger.exception("decode cycle failed")
            del self.batches[kind]
            for row in batch.rows:
                row.key.post(("error", exc))
            return
        for row, ids in zip(batch.rows, added, strict=True):
            self._send(row.key, ids)
        self._retire(kind)

    def _retire(self, kind: tuple) -> None:
        """Rows that finished (their last text and counters to their requests) or were abandoned leave."""
        batch = self.batches[kind]
        keep = [i for i, row in enumerate(batch.rows) if not (row.done or row.key.cancelled.is_set())]
        for row in batch.drop(keep):
            job = row.key
            if not job.cancelled.is_set():
                if tail := job.text.close():
                    job.post(("text", tail))
                job.post(("done", row.stats))
        if not batch.rows:
            del self.batches[kind]

    @staticmethod
    def _send(job: Job, ids: list[int]) -> None:
        if not job.cancelled.is_set() and (chunk := job.text.feed(ids)):
            job.post(("text", chunk))


def stats_of(rows: Sequence[DecodeStats]) -> DecodeStats:
    """The counters of one request's rows (prompts decoded as rows of their own) as one ``DecodeStats``."""
    names = ("prompt_tokens", "new_tokens", "full_calls", "row_calls", "module_calls", "drafted", "accepted",
             "rejected")
    return DecodeStats(batch=len(rows), finish_reasons=[r.finish_reasons[0] for r in rows],
                       **{n: sum(getattr(r, n) for r in rows) for n in names})
