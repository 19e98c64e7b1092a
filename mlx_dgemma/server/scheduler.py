"""The scheduler: one thread that owns the model and the batch (rows, not math).

Requests wait in a queue (at most `max_queue`); up to `max_concurrency` of them are in the batch. A request is
encoded alone (from the prompt cache when a prefix is there) and joins the batch at the next canvas boundary; each
canvas is one run of the shared canvas loop (`diffusion.canvas_loop`: the reference's or the fast sampler's) over
all rows. A row leaves when it has its tokens (an
end-of-turn id or its `max_tokens`), and a cancelled row (a client gone, a stop string found) leaves after the
denoising step in flight. Requests whose diffusion settings differ cannot share a step; each setting has its own
batch and the batches take turns canvas by canvas.

The HTTP side talks to it through a `Handle`: events come back on the request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..diffusion import RandomSource, canvas_loop, cut_at_eos, prefill, resolve_settings
from ..fast_loop import StepWork
from ..parallel import lost_rank_message
from .batch import RowRandomSource, stack
from .prompt_cache import PromptCache
from .errors import RequestError
from .request import GenerationRequest

log = logging.getLogger("mlx_dgemma.server")
IDLE_SECONDS = 1.0  # how long the thread waits for work before it looks again
REST_SECONDS = 0.25  # the same with a distributed model, whose other ranks sleep that long each time: the most a
# request that comes meanwhile waits for them to wake


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str  # "tokens" (committed ids), "draft" (the canvas's argmax ids), "done", "error"
    tokens: list[int] = field(default_factory=list)
    final: bool = False
    finish_reason: str | None = None  # with "done": "stop", "length" or "cancelled"
    message: str = ""
    stats: dict = field(default_factory=dict)


class Handle:
    """One request, as the HTTP side holds it."""

    _ids = itertools.count(1)

    def __init__(self, request: GenerationRequest, settings, loop: asyncio.AbstractEventLoop, wake):
        self.id = next(self._ids)
        self.request, self.settings = request, settings
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._wake = wake
        self.submitted = time.perf_counter()

    def put(self, event: Event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def cancel(self):
        """Stop generating (safe from any thread): the row leaves after the step in flight."""
        self.cancelled.set()
        self._wake()

    async def next(self) -> Event:
        return await self.queue.get()


@dataclass
class _Job:
    handle: Handle
    source: RandomSource
    cache: object = None  # the one-row cache, until the job joins a batch
    length: int = 0  # tokens of this row in the cache
    emitted: int = 0
    steps: int = 0
    visits: int = 0  # canvas positions computed for this row
    canvases: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    admitted: float = 0.0

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class _Batch:
    def __init__(self, settings):
        self.settings = settings
        self.jobs: list[_Job] = []
        self.joining: list[_Job] = []
        self.cache = None


class Scheduler:
    def __init__(self, model, tokenizer, *, max_concurrency: int = 4, max_queue: int = 32,
                 prompt_cache: PromptCache | None = None, prefill_step_size: int = 2048):
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.prefill_step_size = prefill_step_size
        self.canvas_length = model.args.canvas_length
        self._queue: deque[_Job] = deque()
        self._batches: dict[str, _Batch] = {}
        self._turn = 0
        self._active = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx_dgemma-scheduler", daemon=True)
        self.canvases_run = 0
        self.steps_run = 0  # denoising steps (one decoder pass over the whole batch each)
        self.largest_batch = 0

    # --- the HTTP side ---------------------------------------------------------------------------------------

    def start(self):
        self._thread.start()

    def stop(self):
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> dict:
        with self._cv:
            return {"running": self._active, "queued": len(self._queue), "max_concurrency": self.max_concurrency,
                    "max_queue": self.max_queue, "canvases_run": self.canvases_run, "steps_run": self.steps_run,
                    "largest_batch": self.largest_batch}

    def settings_for(self, request: GenerationRequest):
        """The request's sampler settings (raises RequestError for a bad value)."""
        overrides = dict(request.sampler)
        if request.sampler_name is not None:
            overrides["sampler"] = request.sampler_name
        try:
            return resolve_settings(self.model, overrides)
        except TypeError:
            raise RequestError(f"sampler {request.sampler_name!r} is not available in this version of mlx_dgemma",
                               param="sampler") from None
        except ValueError as e:
            raise RequestError(str(e), param=str(e).split("=", 1)[0]) from None

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Handle:
        settings = self.settings_for(request)
        handle = Handle(request, settings, loop, self._wake)
        with self._cv:
            if self._active + len(self._queue) >= self.max_concurrency + self.max_queue:
                raise QueueFull
            self._queue.append(_Job(handle, RandomSource(request.seed)))
            self._cv.notify_all()
        return handle

    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    # --- the thread ------------------------------------------------------------------------------------------

    def _run(self):
        rest = getattr(self.model, "rest", None)  # a distributed model's other ranks sleep while nothing runs
        pause = IDLE_SECONDS if rest is None else REST_SECONDS
        while True:
            with self._cv:
                idle = not self._stopping and not self._queue and not self._busy()
                if idle:
                    self._cv.wait(pause)
                    idle = not self._stopping and not self._queue and not self._busy()
                if self._stopping:
                    break
            if idle:
                if rest is not None:
                    try:
                        rest(pause)  # outside the lock: requests queue meanwhile
                    except RuntimeError as e:
                        if not self._lost_rank(e):
                            raise
                continue
            self._admit()
            batch = self._next_batch()
            if batch is None:
                continue
            try:
                self._run_canvas(batch)
            except Exception as e:  # never let one failure wedge the server: fail this batch's rows, go on
                if not self._lost_rank(e):
                    log.exception("a canvas failed; its requests get the error")
                for job in batch.jobs + batch.joining:
                    self._fail(job, f"generation failed: {type(e).__name__}: {e}")
                batch.jobs, batch.joining, batch.cache = [], [], None
        for job in list(self._queue) + [j for b in self._batches.values() for j in b.jobs + b.joining]:
            self._fail(job, "the server is shutting down")

    def _lost_rank(self, error: BaseException) -> bool:
        """A distributed model lost one of its ranks: nothing can run any more, so the server stops (a SIGTERM to
        itself: uvicorn shuts down, the requests in flight get their error first). False for any other error."""
        message = lost_rank_message(error)
        if message is None:
            return False
        if not self._stopping:
            print(f"error: the server stops: {message}", file=sys.stderr, flush=True)
            self._stopping = True
            os.kill(os.getpid(), signal.SIGTERM)
        return True

    def _busy(self) -> bool:
        return any(b.jobs or b.joining for b in self._batches.values())

    def _admit(self):
        while True:
            with self._cv:
                if not self._queue or self._active >= self.max_concurrency:
                    return
                job = self._queue.popleft()
                self._active += 1
            if job.handle.cancelled.is_set():
                self._end(job, "cancelled")
                continue
            try:
                self._prefill(job)
            except _Cancelled:
                self._end(job, "cancelled")
                continue
            except Exception as e:
                if not self._lost_rank(e):
                    log.exception("encoding a prompt failed")
                self._fail(job, f"encoding the prompt failed: {type(e).__name__}: {e}")
                continue
            key = repr(job.handle.settings)
            self._batches.setdefault(key, _Batch(job.handle.settings)).joining.append(job)

    def _prefill(self, job: _Job):
        start = job.admitted = time.perf_counter()
        ids = job.request.prompt_ids
        cache = self.model.make_cache()
        if job.request.image_patches:
            self._prefill_images(job, cache)
        else:
            job.cached_tokens = self.prompt_cache.restore(cache, ids)
            for point in sorted({*job.request.cache_points, len(ids)}):
                for begin in range(cache.offset, point, self.prefill_step_size):
                    if job.handle.cancelled.is_set():
                        raise _Cancelled
                    end = min(point, begin + self.prefill_step_size)
                    prefill(self.model, mx.array([ids[begin:end]]), cache, None, self.prefill_step_size)
                if point > job.cached_tokens:
                    self.prompt_cache.store(ids[:point], cache)
        job.cache, job.length = cache, len(ids)
        job.prefill_seconds = time.perf_counter() - start

    def _prefill_images(self, job: _Job, cache):
        """A prompt with images: the text before the first image may come from the prompt cache; nothing of it
        goes in (its ids do not say which images it holds)."""
        ids, encoder = job.request.prompt_ids, self.model.vision
        first = ids.index(encoder.boi_token_id) if encoder.boi_token_id in ids else len(ids)
        job.cached_tokens = self.prompt_cache.restore(cache, ids[:first])
        images = encoder.prompt_images(np.array([ids]), encoder.features(job.request.image_patches))
        rest = images.columns(job.cached_tokens, len(ids))
        prefill(self.model, mx.array([ids[job.cached_tokens:]]), cache, None, self.prefill_step_size, rest)

    def _next_batch(self) -> _Batch | None:
        ready = [b for b in self._batches.values() if b.jobs or b.joining]
        if not ready:
            self._batches.clear()
            return None
        self._turn += 1
        return ready[self._turn % len(ready)]

    def _run_canvas(self, batch: _Batch):
        model, C = self.model, self.canvas_length
        if batch.joining:
            caches = ([batch.cache] if batch.jobs else []) + [j.cache for j in batch.joining]
            lengths = ([[j.length for j in batch.jobs]] if batch.jobs else []) + [[j.length] for j in batch.joining]
            batch.cache = stack(model, caches, lengths)
            batch.jobs += batch.joining
            for job in batch.joining:
                job.cache = None
            batch.joining = []
        elif batch.cache.offset > max(j.length for j in batch.jobs):  # the longest row left: trim the padding
            batch.cache.reframe(model, max(j.length for j in batch.jobs), [j.length for j in batch.jobs])
        jobs = list(batch.jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        settings = batch.settings
        B = len(jobs)
        rng = RowRandomSource([j.source for j in jobs])
        drafts = any(j.request.drafts and j.request.stream for j in jobs)

        def rows_to_keep():
            gone = {i for i, j in enumerate(jobs) if j.handle.cancelled.is_set()}
            if not gone:
                return None
            for i in gone:
                self._end(jobs[i], "cancelled")
            rows = [i for i in range(len(jobs)) if i not in gone]
            jobs[:] = [jobs[i] for i in rows]
            return rows

        loop = canvas_loop(settings)
        # the reference loop lets rows leave after any step; the fast sampler's only at the canvas boundary
        leave = {"rows_to_keep": rows_to_keep} if settings.sampler == "reference" else {}
        work = StepWork(mx.zeros((B,), dtype=mx.int32), mx.zeros((B,), dtype=mx.int32))
        steps_iter = loop(model, batch.cache, rng.canvas((B, C), model.args.vocab_size), settings, rng, work,
                          finished=mx.zeros((B,), dtype=mx.bool_), drafts=drafts, **leave)
        while True:
            try:
                _, draft = next(steps_iter)
            except StopIteration as end:
                argmax = end.value[0]
                break
            self.steps_run += 1
            for i, job in enumerate(jobs):
                job.steps += 1
                if drafts and job.request.drafts and draft is not None:
                    row, _ = cut_at_eos(draft[i], settings.eos_token_ids, job.request.max_tokens - job.emitted)
                    job.handle.put(Event("draft", tokens=row))
        tokens = np.array(argmax) if jobs else None
        for job, visits in zip(jobs, np.array(work.visits).tolist() if jobs else []):
            job.visits += int(visits)
        self.canvases_run += 1
        if tokens is None or not jobs:
            batch.jobs, batch.cache = [], None
            return
        going_on = []
        for i, job in enumerate(jobs):
            new, ended = cut_at_eos(tokens[i].tolist(), settings.eos_token_ids, job.request.max_tokens - job.emitted)
            job.emitted += len(new)
            job.canvases += 1
            done = ended or job.emitted >= job.request.max_tokens or job.handle.cancelled.is_set()
            job.handle.put(Event("tokens", tokens=new, final=done))
            if done:
                reason = "stop" if ended else "length" if job.emitted >= job.request.max_tokens else "cancelled"
                self._end(job, reason)
            else:
                going_on.append(i)
        if not going_on:
            batch.jobs, batch.cache = [], None
            return
        if len(going_on) < len(jobs):
            batch.cache.select(going_on)
        batch.jobs = [jobs[i] for i in going_on]
        model.encode(mx.array(np.asarray(tokens)[going_on]), batch.cache)
        mx.eval(batch.cache.state())
        for job in batch.jobs:
            job.length += C

    # --- endings ---------------------------------------------------------------------------------------------

    def _stats(self, job: _Job) -> dict:
        return {"prompt_tokens": len(job.request.prompt_ids), "cached_tokens": job.cached_tokens,
                "canvases": job.canvases, "steps": job.steps, "visits": job.visits,
                "prefill_seconds": job.prefill_seconds,
                "queue_seconds": max(0.0, job.admitted - job.handle.submitted) if job.admitted else 0.0}

    def _end(self, job: _Job, reason: str):
        self._release()  # first: a client that reads "done" then asks /health sees the row free
        job.handle.put(Event("done", finish_reason=reason, stats=self._stats(job)))

    def _fail(self, job: _Job, message: str):
        self._release()
        job.handle.put(Event("error", message=message, stats=self._stats(job)))

    def _release(self):
        with self._cv:
            self._active = max(0, self._active - 1)


class _Cancelled(Exception):
    pass
