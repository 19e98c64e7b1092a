"""One rank's part of the model, for several processes under MLX's own distributed backend (`mx.distributed`).

Loading a rank's part and starting a run are in `distributed.py`; how the model is split and the layers each
mode adds to it, in `parallel.py`.

Two ways to share the work (`--pipeline` or `--experts-parallel` on any command line):

* pipeline: rank r owns a consecutive range of layers (rank 0 the first, plus the embedding, the self-conditioning
  block, the final norm and the tied head). The hidden states go 0 -> 1 -> ... -> N-1 with `send`/`recv`, and
  come back to rank 0 with one `all_sum` (the others add zeros), which also orders the return after the send.
* experts: every rank holds attention, dense MLP, router and norms of every layer and 1/N of each layer's experts
  (any quantization: the expert axis is never a quantized one). Each rank computes only its own experts' top-k
  slots; one `all_sum` per layer joins the ranks' slots before the weighted sum and the norm that follow them
  (exactly as one process, see `ShardedExperts`; `exact=False` all-sums each rank's weighted sum instead).

One sampler, one truth: rank 0 alone runs the caller's code (the diffusion loop, chat, a server) and owns the random
stream. The other ranks only serve: before every encoder or decoder pass rank 0 broadcasts a header (what to run,
the shapes, which cached state to run on) and the padding mask, so no rank ever decides anything by itself and none
can diverge. MLX has no broadcast: an `all_sum` to which the others contribute zeros stands in for one.

A worker mirrors rank 0's caches by version: every encode on rank 0 makes a new version, and so does every change
a server's batch makes to a cache (rows leaving, moved into a new frame, joined: `ShardedCache`), which the workers
repeat on their layers. A version is held by a small handle in rank 0's cache (so chat's snapshots and roll-backs
and the server's prompt cache carry it like any cache array); a worker keeps each version's arrays until rank 0
drops the last reference to its handle.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import weakref

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, LayerCache
from .config import ModelArgs
from .model import Model
from .parallel import Broadcast, DistributedError, Flag, Hop, ShardedExperts
from .watchdog import DEFAULT_PEER_TIMEOUT, Watchdog

ENCODE, DENOISE, STOP, REST, SELECT, REFRAME, JOIN = 1, 2, 3, 4, 5, 6, 7
HEADER = 8  # op, batch, length (REST: milliseconds), has_mask, base version, new version, dead versions, extras


class _Version:
    """Rank 0's handle on one cached state mirrored by the workers; when it is collected they drop it too."""

    nbytes = 0  # what it holds on rank 0, for code that sizes a cache's snapshot (the server's prompt cache)

    def __init__(self, number: int, dead: collections.deque):
        self.number = number
        weakref.finalize(self, dead.append, number)


def _version_number(cache: Cache | None) -> int:
    """The number of the workers' version that rank 0's `cache` stands for (0: an empty cache, or none)."""
    handle = cache.layers[-1].keys if cache is not None else None
    return handle.number if handle is not None else 0


class _Mirror(LayerCache):
    """The last entry of rank 0's cache: the workers' matching state (a `_Version`), or None for an empty cache."""

    def state(self):
        return []

    @property
    def length(self) -> int:
        return 0


class ShardedCache(Cache):
    """Rank 0's cache: its own layers' state, and the workers' as a version. The batch surgery of a server
    (rows leaving, reframed, joined) runs here and is announced, so every worker repeats it on its layers."""

    def __init__(self, args: ModelArgs, model: ShardedModel):
        super().__init__(args)
        self.layers.append(_Mirror())
        self.model = model

    @contextlib.contextmanager
    def _own_layers(self):
        # the last entry holds a version, not arrays: out of the way of the per-layer surgery
        mirror = self.layers.pop()
        try:
            yield
        finally:
            self.layers.append(mirror)

    def select(self, rows: list[int]):
        with self._own_layers():
            super().select(rows)
        self.model._mirror(SELECT, self, list(rows))

    def reframe(self, model, offset: int, real_lengths: list[int]):
        with self._own_layers():
            super().reframe(model, offset, real_lengths)
        self.model._mirror(REFRAME, self, [offset, *real_lengths])

    def join(self, caches: list[Cache], rows: list[int]):
        with self._own_layers():
            super().join(caches, rows)
        versions = [_version_number(c) for c in caches]
        self.model._mirror(JOIN, self, [x for pair in zip(versions, rows) for x in pair])


def resting(model):
    """`model.resting()` for a distributed model, else nothing."""
    return model.resting() if isinstance(model, ShardedModel) else contextlib.nullcontext()


# --- the model on each rank ----------------------------------------------------------------------------------------


class ShardedModel(Model):
    """The model as one rank holds it. On rank 0 it is a drop-in `Model` for every caller; on the others,
    `serve()` runs what rank 0 announces until it says stop."""

    def __init__(self, args: ModelArgs, group, mode: str, layers: range, experts: range, exact: bool = True,
                 peer_timeout: float = DEFAULT_PEER_TIMEOUT):
        super().__init__(args)
        self.group, self.mode, self.rank, self.size = group, mode, group.rank(), group.size()
        self.owned, self.experts_owned = layers, experts
        self._dead = collections.deque()  # versions rank 0 no longer holds (appended by finalizers)
        self._versions = 0
        self._lock = threading.Lock()
        self._closed = False
        self._announced = Flag()  # set while an announced pass builds its graph
        self._watchdog = Watchdog(self.rank, peer_timeout) if self.size > 1 else None
        for i in range(args.num_hidden_layers):
            if i not in layers:
                self.layers[i] = nn.Module()
            elif mode == "experts":
                self.layers[i].experts = ShardedExperts(args, experts.start, len(experts), group, exact)
        if self.rank != 0:  # the embedding, head and self-conditioning live on rank 0 only
            self.embed_tokens = nn.Module()
            self.self_conditioning = nn.Module()

    def wire(self):
        """After loading: rank 0's layer list gains the collectives that hand h to the other ranks."""
        if self.rank == 0 and self.size > 1:
            if self.mode == "pipeline":
                hop = Hop(self.group, self.layers[0].layer_type, self.dtype, self._announced)
                self.layers = self.layers[: len(self.owned)] + [hop]
            else:
                self.layers[0] = Broadcast(self.layers[0], self.group, self.dtype, self._announced)

    # --- rank 0: the Model API, each pass announced first --------------------------------------------------------

    def make_cache(self) -> ShardedCache:
        return ShardedCache(self.args, self)

    def encode(self, input_ids, cache, attention_mask=None, *, images=None):
        if images is not None and self.size > 1:
            raise DistributedError("images are not supported with --pipeline or --experts-parallel yet")
        input_ids = mx.array(input_ids)
        B, L = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, L)}")
        with self._lock, self._waiting("an encoder pass"):
            self._versions += 1
            version = _Version(self._versions, self._dead)
            self._announce(ENCODE, cache, B, L, attention_mask, version.number)
            with self._announced:
                h = super().encode(input_ids, cache, attention_mask)
            self._run(h, cache.state())
            cache.layers[-1].keys = cache.layers[-1].values = version
        return h

    def denoise_raw(self, canvas, cache, distribution=None, total=None):
        canvas = mx.array(canvas)
        with self._lock, self._waiting("a decoder pass"):
            self._announce(DENOISE, cache, *canvas.shape)
            with self._announced:
                logits = super().denoise_raw(canvas, cache, distribution, total)
            self._run(logits)
        return logits

    def _run(self, *arrays):
        # With other ranks, a pass runs to its end here, under the lock and the watchdog. Its collectives run in
        # the caller's eval otherwise: outside the lock (another thread's announcement, close() at a server's
        # exit, could come between) and with no bound on waiting for a stuck rank.
        if self.size > 1:
            mx.eval(*arrays)

    def _mirror(self, op, cache, extra: list[int]):
        """Announce a change rank 0 made to `cache` (its new state is a new version on every worker)."""
        if self.size == 1:
            return
        with self._lock, self._waiting("a cache operation"):
            self._versions += 1
            version = _Version(self._versions, self._dead)
            self._announce(op, cache, new=version.number, extra=extra)
            cache.layers[-1].keys = cache.layers[-1].values = version

    def _waiting(self, what: str):
        return self._watchdog.waiting(what) if self._watchdog is not None else contextlib.nullcontext()

    def rest(self, seconds: float):
        """Rank 0 has nothing to run for about `seconds` (a server with no request): the other ranks sleep that
        long rather than spin in MLX's ring wait for the next header (a pass announced sooner waits for them)."""
        if self.size == 1 or self._closed or not self._lock.acquire(blocking=False):
            return
        try:
            with self._waiting("a rest announcement"):
                self._announce(REST, L=int(seconds * 1000))
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def resting(self, every: float = 0.25):
        """While rank 0 waits on something other than MLX (a chat's prompt), a thread has the other ranks rest in
        `every`-second naps. Rank 0's own threads must run nothing of MLX meanwhile."""
        if self.rank != 0 or self.size == 1:
            yield
            return
        stop = threading.Event()

        def nap():
            try:
                while not stop.is_set():
                    self.rest(every)
                    stop.wait(every)
            except RuntimeError:
                pass  # a rank left: rank 0's next pass says so

        thread = threading.Thread(target=nap, name="mlx_dgemma-rest", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _announce(self, op, cache=None, B=0, L=0, mask=None, new=0, extra: list[int] = ()):
        if self.size == 1:
            return
        if self._closed:
            raise DistributedError("the distributed model was closed")
        dead = [self._dead.popleft() for _ in range(len(self._dead))]
        base = _version_number(cache)
        header = mx.array([op, B, L, int(mask is not None), base, new, len(dead), len(extra)], dtype=mx.int32)
        mx.eval(mx.distributed.all_sum(header, group=self.group))
        payload = [mx.array(dead, dtype=mx.int32)] + ([mx.array(mask).astype(mx.int32).reshape(-1)] if mask is not None else [])
        payload.append(mx.array(list(extra), dtype=mx.int32))
        if sum(p.size for p in payload):
            mx.eval(mx.distributed.all_sum(mx.concatenate(payload), group=self.group))

    def close(self):
        """Tell the other ranks to exit (rank 0; called at exit)."""
        if self.rank != 0 or self._closed or self.size == 1:
            return
        if not self._lock.acquire(timeout=60):  # a pass still in flight (a server's thread): its collectives first
            return
        try:
            with self._waiting("telling the other ranks to stop"):
                self._announce(STOP)
        except RuntimeError:
            pass  # a rank already left: nothing to tell
        finally:
            self._lock.release()
        self._closed = True

    # --- the other ranks ------------------------------------------------------------------------------------------

    def serve(self):
        """Run rank 0's passes on this rank's part of the model until rank 0 says stop."""
        cache = Cache(self.args)
        versions = {0: cache.snapshot()}
        while True:
            # waiting for the header is idle time (rank 0 may have nothing to do); what follows it is bounded
            header = mx.distributed.all_sum(mx.zeros((HEADER,), dtype=mx.int32), group=self.group).tolist()
            op, B, L, has_mask, base, new, n_dead, n_extra = header
            with self._waiting({ENCODE: "an encoder pass", DENOISE: "a decoder pass"}.get(op, "a header")):
                mask, extra, n_mask = None, [], has_mask * B * L
                if n_dead + n_mask + n_extra:
                    size = n_dead + n_mask + n_extra
                    payload = mx.distributed.all_sum(mx.zeros((size,), dtype=mx.int32), group=self.group)
                    mx.eval(payload)
                    for number in payload[:n_dead].tolist():
                        versions.pop(number, None)
                    if has_mask:
                        mask = payload[n_dead:n_dead + n_mask].reshape(B, L).astype(mx.bool_)
                    extra = payload[n_dead + n_mask:].tolist()
                if op in (ENCODE, DENOISE):
                    cache.restore(versions[base])
                    if op == ENCODE:
                        cache.remember_mask(mask, B, L)
                    h = self._stage(cache, B, L, encode=op == ENCODE)
                    mx.eval(h, cache.state())
            if op == STOP:
                return
            if op == REST:
                time.sleep(L / 1000)
            elif op == ENCODE:
                cache.offset += L
                versions[new] = cache.snapshot()
            elif op in (SELECT, REFRAME, JOIN):
                versions[new] = self._repeat(op, versions, base, extra)

    def _repeat(self, op, versions: dict, base: int, extra: list[int]):
        """A worker's copy of rank 0's cache operation (`ShardedCache`): the new version's snapshot."""
        cache = Cache(self.args)
        if op == JOIN:
            parts = []
            for number in extra[::2]:
                parts.append(Cache(self.args))
                parts[-1].restore(versions[number])
            cache.join(parts, extra[1::2])
            return cache.snapshot()
        cache.restore(versions[base])
        if op == SELECT:
            cache.select(extra)
        else:
            cache.reframe(self, extra[0], extra[1:])
        return cache.snapshot()

    def _stage(self, cache, B: int, L: int, encode: bool) -> mx.array:
        """This worker's layers for one pass; returns what it contributes to the closing `all_sum`."""
        shape, group = (B, L, self.args.hidden_size), self.group
        if self.mode == "pipeline":
            h = mx.distributed.recv(shape, self.dtype, self.rank - 1, group=group)
        else:
            h = mx.distributed.all_sum(mx.zeros(shape, dtype=self.dtype), group=group)
        masks = {}
        for i in self.owned:
            layer = self.layers[i]
            t = layer.layer_type
            if t not in masks:  # the first owned layer of a type has the cached length all of its type share
                masks[t] = (cache.encoder_mask(t, L, cache.layers[i].length) if encode else cache.decoder_mask(i, L))
            h = layer(h, cache.offset, cache.layers[i], masks[t], encode=encode)
        if self.mode == "experts":
            return h
        if self.rank == self.size - 1:
            return mx.distributed.all_sum(h, group=group)
        sent = mx.distributed.send(h, self.rank + 1, group=group)
        return mx.distributed.all_sum(mx.depends(mx.zeros_like(h), sent), group=group)

    def resident_bytes(self) -> int:
        """Bytes of the weights this rank holds."""
        return sum(v.nbytes for _, v in nn.utils.tree_flatten(self.parameters()))
