"""A bound on how long one rank of a distributed run waits for the others during a pass.

MLX's collectives have no timeout. A rank that dies closes its sockets, and the ring backend then fails the others'
collectives (`parallel.peer_lost`); a rank that is stuck (stopped, asleep, swapping, wedged) keeps them open, and
the ranks waiting on it would wait forever. So each rank marks the spans in which it waits on the others for work
that is bounded (a header exchange, a pass's collectives), and a thread ends the process with a message when one
lasts longer than the limit. The idle wait of a worker for rank 0's next pass (a server with no request, a chat at
its prompt) is not bounded: rank 0 may rightly say nothing for hours. A rank 0 that hangs there is the process the
user started and sees.

The thread never touches MLX: it only reads the time a span began.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

DEFAULT_PEER_TIMEOUT = 120.0  # seconds; a pass of the released model takes seconds on a Mac


class Watchdog:
    def __init__(self, rank: int, timeout: float = DEFAULT_PEER_TIMEOUT):
        self.rank, self.timeout = rank, float(timeout)
        self._since: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="mlx_dgemma-peer-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def waiting(self, what: str):
        """A span in which this rank may wait on the others, for `what` (named in the message)."""
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self.expire()

    def expire(self):
        print(f"error: rank {self.rank}: {self._what} waited more than {self.timeout:g}s for the other ranks: one "
              f"is stuck (alive but not answering: stopped, asleep or out of memory); ending this rank, start every "
              f"rank again (--peer-timeout sets the limit)", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread is inside an MLX collective that nothing can interrupt
