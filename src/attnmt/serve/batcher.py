"""Dynamic batching: the lines of concurrent requests share the engine's batches.

Requests arrive one by one on the event loop; the engine translates best in large batches. The
:class:`Batcher` queues each request's encoded lines as a :class:`Job`. Once the engine is free and a
job waits, its loop waits ``wait_s`` for others (or until ``gather_tokens`` source tokens are queued) and
hands the lines of every job with the same search settings to the engine in one call, in a worker
thread, so that the event loop keeps taking requests meanwhile. Under load a call takes what queued
up during the last one and the next requests of the clients it answered; with one client a request
waits ``wait_s`` at most. A call can hold no more lines than the requests waiting: with 32 clients of
one sentence each, 32 lines, where attnmt-translate batches a file in calls of over a hundred
(docs/BENCHMARKS.md has what that costs).

Each line keeps its line number within its own request (1, 2, ...), so sampling draws what it would
for that request alone, and the engine's batching never changes a search's result. A job whose client
has gone before its turn is dropped unseen.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field

from attnmt import inference
from attnmt.config import DecodeConfig
from attnmt.decoding import Hypothesis
from attnmt.inference import Engine, Translation

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """More lines are queued than the batcher takes (``max_pending_lines``): try again later."""


@dataclass
class Job:
    """One request's lines: encoded sources, how to search them, and the future of its result."""

    sources: list[list[int]]
    cfg: DecodeConfig
    tgt_prefix: tuple[int, ...] = ()
    attention: bool = False  # also the cross-attention maps of each line (engine=native)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def key(self) -> tuple:
        """Jobs with equal keys are searched in one engine call."""
        return astuple(self.cfg), self.tgt_prefix

    @property
    def tokens(self) -> int:
        return sum(len(source) for source in self.sources)


@dataclass
class Result:
    """A job's translations (one per line, in order) and, if asked for, each line's attention maps
    as nested lists ``[layer][head][target][source]`` rounded to 4 decimals (made in the worker
    thread: for long lines it is work), None for an empty line."""

    translations: list[Translation]
    attention: list[list | None] | None = None


class Batcher:
    """Gathers jobs into engine calls, one call at a time, in a worker thread.

    Args:
        engine: the opened engine; only the batcher's thread searches with it (the event loop uses
            its tokenizer, to encode requests and name pieces).
        wait_s: how long the batcher waits for more jobs once the engine is free and one is queued.
        gather_tokens: source tokens gathered into one engine call before it starts without waiting
            (``attnmt-serve gather_tokens=``; the engine cuts the call into batches of at most its
            decode settings' ``max_tokens``).
        max_pending_lines: queued lines past which :meth:`submit` refuses new jobs.
    """

    def __init__(self, engine: Engine, wait_s: float, gather_tokens: int, max_pending_lines: int) -> None:
        self.engine = engine
        self.wait_s = wait_s
        self.gather_tokens = gather_tokens
        self.max_pending_lines = max_pending_lines
        self.pending_lines = 0  # submitted, not yet handed to the engine
        self.translated_lines = 0
        self.engine_calls = 0
        self.engine_seconds = 0.0  # time spent in engine calls
        # A deque and an event rather than an asyncio.Queue: waiting for a queue's get() with a timeout
        # (asyncio.wait_for) can lose the item that arrives as the time runs out (Python 3.11).
        self._jobs: deque[Job] = deque()
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the loop on the running event loop (again after :meth:`stop`: a test's second client)."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="attnmt-engine")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="attnmt-batcher")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task) -> None:
        """A loop that ended by an error (a bug) fails what waits, loudly, rather than leave it hanging."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batcher stopped: %r; no more translations", task.exception())
        self._fail_queued(RuntimeError(f"the batcher stopped: {task.exception()!r}"))

    def _fail_queued(self, error: Exception) -> None:
        _fail(self._jobs, error)
        self._jobs.clear()
        self.pending_lines = self._queued_tokens = 0

    async def stop(self) -> None:
        """Stop the loop once the engine call under way (if any) has ended; what is still queued is
        answered with an error. The server calls it after its requests have drained."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._fail_queued(RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; its future gets a :class:`Result`.

        Raises:
            Overloaded: ``max_pending_lines`` would be exceeded.
        """
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if self.pending_lines + len(job.sources) > self.max_pending_lines and self.pending_lines > 0:
            raise Overloaded(f"{self.pending_lines} lines are waiting for the engine")
        self.pending_lines += len(job.sources)
        self._queued_tokens += job.tokens
        self._jobs.append(job)
        self._arrived.set()
        return job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if not job.future.done():  # done already: cancelled, its client gone
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                try:
                    results = await loop.run_in_executor(self._executor, self._translate, group)
                except asyncio.CancelledError:  # stopped: what this round holds is answered, not left waiting
                    _fail(jobs, RuntimeError("the server is shutting down"))
                    raise
                except Exception as err:  # a bug or out of memory: these requests fail, the service goes on
                    log.exception("translating %d requests failed", len(group))
                    results = [err] * len(group)
                for job, result in zip(group, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    async def _gather(self) -> list[Job]:
        """The queued jobs, oldest first, once ``wait_s`` has passed since the engine was free and a
        job there, or about ``gather_tokens`` source tokens are queued; at most about ``gather_tokens`` of them.

        The wait starts when the engine is free, not when the oldest job arrived: under load the
        oldest has waited out the last call already, but the clients that call answered have not yet
        sent their next requests. Counting from the arrival, calls held 19.6 lines with 32 clients
        instead of 31.2, and greedy throughput fell from 215 to 182 sentences/s (docs/BENCHMARKS.md).
        """
        loop = asyncio.get_running_loop()
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.wait_s
        while self._queued_tokens < self.gather_tokens and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        jobs: list[Job] = []
        tokens = 0
        while self._jobs and (not jobs or tokens + self._jobs[0].tokens <= self.gather_tokens):
            job = self._jobs.popleft()
            jobs.append(job)
            tokens += job.tokens
        self._queued_tokens -= tokens
        self.pending_lines -= sum(len(job.sources) for job in jobs)
        return jobs

    def _translate(self, jobs: list[Job]) -> list[Result]:
        """One engine call for the lines of ``jobs`` (equal keys), in the worker thread."""
        sources = [source for job in jobs for source in job.sources]
        line_numbers = [number for job in jobs for number in range(1, len(job.sources) + 1)]
        first = jobs[0]
        start = time.perf_counter()
        translations = self.engine.translate_sources(sources, first.cfg, line_numbers, tgt_prefix=first.tgt_prefix)
        self.engine_seconds += time.perf_counter() - start
        self.engine_calls += 1
        self.translated_lines += len(sources)
        results, offset = [], 0
        for job in jobs:
            results.append(result(self.engine, job, translations[offset : offset + len(job.sources)]))
            offset += len(job.sources)
        return results


def result(engine: Engine, job: Job, translations: list[Translation]) -> Result:
    """``job``'s :class:`Result`: its translations, and each line's attention maps if it asked for them
    (drawn here, in the engine's thread: for long lines it is work)."""
    attention = None
    if job.attention:
        attention = [engine.backend.attention_maps(source, t.tokens[0]).round(decimals=4).tolist()
                     if source else None for source, t in zip(job.sources, translations)]
    return Result(translations, attention)


def _fail(jobs, error: Exception) -> None:
    """Answer ``error`` to each of ``jobs`` still waiting."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


@dataclass
class _Running:
    """A job in the running search: each line's hypotheses as they finish."""

    job: Job
    tickets: list[int]  # of its non-empty lines
    hypotheses: list[list[Hypothesis]]
    left: int  # lines not yet finished


class RunningBatcher:
    """Continuous batching, for engines with a running search (``engine=native``): each request's
    lines join the engine's search at its next step and leave it as soon as they are translated, so
    that every step decodes every line in flight, whenever it came (:class:`attnmt.decoding.RunningSearch`).

    One engine thread owns the searches, one for each set of search settings (a request's decode
    settings and target prefix), and steps each that has work in turn; the event loop only queues
    jobs and wakes it. A request is answered once all its lines have finished. A job whose client
    has gone (its future done) leaves at the next step, its rows freed. Its interface is
    :class:`Batcher`'s.

    Args:
        engine: the opened engine (its backend has ``running_search``).
        max_rows: rows (lines x beams, or draws) decoded at once; lines beyond wait for rows to free.
        max_pending_lines: lines waiting to join past which :meth:`submit` refuses new jobs.
    """

    def __init__(self, engine: Engine, max_rows: int, max_pending_lines: int) -> None:
        self.engine = engine
        self.max_rows = max_rows
        self.max_pending_lines = max_pending_lines
        self.pending_lines = 0  # submitted, not yet joined a search
        self.translated_lines = 0
        self.engine_calls = 0  # decoding steps
        self.engine_rows = 0  # rows decoded, summed over the steps
        self.engine_seconds = 0.0  # time spent in steps
        self._lock = threading.Lock()
        self._inbox: deque[Job] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._left_waiting = 0  # lines the last steps left waiting for rows

    def start(self) -> None:
        """Start the engine thread (again after :meth:`stop`)."""
        self._loop = asyncio.get_running_loop()
        self._stopping, self._error = False, None
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="attnmt-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread after its step under way; what waits or runs is answered with an error."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        with self._lock:
            jobs, self._inbox = list(self._inbox), deque()
            self.pending_lines = 0
        _fail(jobs, RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; its future gets a :class:`Result`.

        Raises:
            Overloaded: ``max_pending_lines`` would be exceeded.
        """
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the batcher is not running" + (f": {self._error!r}" if self._error else ""))
        with self._lock:
            if self.pending_lines + len(job.sources) > self.max_pending_lines and self.pending_lines > 0:
                raise Overloaded(f"{self.pending_lines} lines are waiting for the engine")
            self.pending_lines += len(job.sources)
            self._inbox.append(job)
        self._wake.set()
        return job.future

    def _run(self) -> None:
        """The engine thread: takes queued jobs into the searches and steps them until stopped."""
        searches: dict[tuple, tuple[object, dict[int, tuple[_Running, int]]]] = {}  # key -> (search, ticket -> line)
        running: list[_Running] = []
        try:
            while not self._stopping:
                if not searches and not self._inbox:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                with self._lock:
                    jobs, self._inbox = list(self._inbox), deque()
                for job in jobs:
                    if not job.future.done():  # done already: its client has gone
                        running.append(self._join(job, searches))
                running = self._drop_gone(running, searches)
                self._count_pending()
                for key, (search, lines) in list(searches.items()):
                    if not search:
                        del searches[key]
                        continue
                    start = time.perf_counter()
                    finished = search.step()
                    self.engine_seconds += time.perf_counter() - start
                    self.engine_calls += 1
                    self.engine_rows += search.last_rows
                    for ticket, hyps in finished:
                        entry, index = lines.pop(ticket)
                        entry.hypotheses[index] = hyps
                        entry.left -= 1
                # What the steps left waiting for rows (a step takes in all that fit first).
                self._left_waiting = sum(search.waiting for search, _ in searches.values())
                self._count_pending()
                done = [entry for entry in running if entry.left == 0]
                if done:
                    running = [entry for entry in running if entry.left > 0]
                    for entry in done:
                        self._answer(entry)
            # Stopped: what is still running is answered, not left waiting.
            _fail_threadsafe(self._loop, [entry.job for entry in running], RuntimeError("the server is shutting down"))
        except BaseException as err:  # a bug or out of memory: fail loudly rather than leave requests hanging
            log.exception("the engine thread stopped; no more translations")
            self._error = err
            failure = RuntimeError(f"the engine stopped: {err!r}")
            _fail_threadsafe(self._loop, [entry.job for entry in running], failure)
            with self._lock:
                jobs, self._inbox = list(self._inbox), deque()
            _fail_threadsafe(self._loop, jobs, failure)

    def _count_pending(self) -> None:
        """Lines submitted that no step has taken in yet: queued here, or left waiting for rows."""
        with self._lock:
            self.pending_lines = sum(len(job.sources) for job in self._inbox) + self._left_waiting

    def _join(self, job: Job, searches: dict) -> _Running:
        """Add ``job``'s lines to the search of its settings (made if none runs)."""
        if job.key not in searches:
            searches[job.key] = (self.engine.backend.running_search(job.cfg, job.tgt_prefix, self.max_rows), {})
        search, lines = searches[job.key]
        entry = _Running(job, [], [[] for _ in job.sources], 0)
        for index, source in enumerate(job.sources):
            if source:  # an empty line is answered empty
                # Line numbers within the request, as attnmt-translate numbers a file's: sampling
                # draws for a line what it would for that request alone.
                ticket = search.add(source, index + 1)
                entry.tickets.append(ticket)
                lines[ticket] = (entry, index)
                entry.left += 1
        return entry

    def _drop_gone(self, running: list[_Running], searches: dict) -> list[_Running]:
        """Cancel the lines of jobs whose clients have gone; their rows leave at the next step."""
        gone = [entry for entry in running if entry.job.future.done()]
        if not gone:
            return running
        for entry in gone:
            search, lines = searches[entry.job.key]
            for ticket in entry.tickets:
                if lines.pop(ticket, None) is not None:
                    search.cancel(ticket)
        return [entry for entry in running if not entry.job.future.done()]

    def _answer(self, entry: _Running) -> None:
        """Detokenize a finished job's lines (and draw its attention maps) and hand it to its future."""
        job = entry.job
        translations = inference.translations(self.engine.tokenizer, entry.hypotheses, job.cfg.nbest)
        answer = result(self.engine, job, translations)
        self.translated_lines += len(job.sources)
        self._loop.call_soon_threadsafe(_set_result, job.future, answer)


def _set_result(future: asyncio.Future, result: Result) -> None:
    if not future.done():
        future.set_result(result)


def _fail_threadsafe(loop: asyncio.AbstractEventLoop | None, jobs: list[Job], error: Exception) -> None:
    """:func:`_fail` from another thread than ``loop``'s."""
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(_fail, jobs, error)
