"""How a worker's slow work runs beside its forward passes: store writes on a background thread
(:class:`Uploads`), and queued block solves on a solver thread (:class:`SolverQueue`) or on the
forward's own thread a block or more behind it (:class:`DeferredSolves`)."""

from __future__ import annotations

import collections
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn


class Uploads:
    """Store writes on one background thread, so a worker goes on with its next stage or block
    while a result is written (synced, or sent to S3); :meth:`wait` returns once every write
    handed over so far is stored and raises the first failure. Record entries leave the worker
    only after a ``wait`` (a block is done only when its stored results are), so no record ever
    names an object that is not there yet."""

    def __init__(self, store):
        self._store = store
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: list[Future] = []

    def put(self, key: str, data: bytes) -> str:
        """Hand ``data`` over to be stored under ``key``; returns its sha256 (for the record
        entry, and passed to the store for its checksum, so the bytes are hashed once)."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-upload")
            self._pending.append(self._pool.submit(self._store.put_bytes, key, data, sha256=digest))
        return digest

    def wait(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        failure = None
        for future in pending:  # every write finishes (or fails) before the first failure is raised
            try:
                future.result()
            except BaseException as err:
                failure = failure or err
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Let the writes handed over finish, then stop the thread. Writes still pending here
        belong to a block that failed, whose error has gone to the driver already: theirs are
        not raised again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._pending = []


class SolverQueue:
    """One background thread that runs queued block solves in the order they were queued.

    ``solve(b, layer, inputs, load)`` does one block's statistics, reductions, solves and store
    writes and returns its report; ``load`` is the per-worker solve work carried across blocks
    (LPT owners, :func:`workers.schedule.assign_owners`). torch releases the GIL in its kernels, so the thread's
    solves overlap the caller's forward passes. The first failure stops the thread and is raised
    by every later call (``check``, ``put``, ``wait_empty``, ``take``).
    """

    def __init__(self, solve, world: int):
        self._solve = solve
        self.load = [0.0] * world
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._pending = 0  # queued or running
        self._finished: list[dict] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="strata-solver", daemon=True)
        self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def check(self) -> None:
        with self._cond:
            self._raise()

    def put(self, b: int, layer: nn.Module, inputs: list, depth: int) -> None:
        """Queue block ``b``, first waiting until fewer than ``depth`` blocks are queued or running."""
        with self._cond:
            while self._pending >= depth and self._error is None:
                self._cond.wait()
            self._raise()
            self._items.append((b, layer, inputs))
            self._pending += 1
            self._cond.notify_all()

    def wait_empty(self) -> None:
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait()
            self._raise()

    def take(self) -> list[dict]:
        """The reports of the blocks finished since the last call, in block order."""
        with self._cond:
            self._raise()
            out, self._finished = self._finished, []
            return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                b, layer, inputs = self._items.popleft()
            try:
                report = self._solve(b, layer, inputs, self.load)
            except BaseException as err:  # raised to the driver by the next call
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            del layer, inputs  # the block's copy and its inputs are freed before the next block
            with self._cond:
                self._finished.append(report)
                self._pending -= 1
                self._cond.notify_all()


class DeferredSolves:
    """Queued block solves run on the caller's own thread, ``depth`` blocks behind its forward:
    each ``put`` solves the oldest blocks until at most ``depth`` remain. One-stage float blocks
    come with their reductions already issued (asynchronously, when their sums were complete),
    so a worker meets the others only when it solves a block whose sums they sent long
    before; work that differs between workers in one block evens out over the next ones
    (``load``, carried as in :class:`SolverQueue`) instead of holding every worker at each
    block. The same interface and reports as :class:`SolverQueue`, without a second thread
    that would share the worker's core with the forward."""

    def __init__(self, solve, world: int):
        self._solve = solve
        self.load = [0.0] * world
        self._items: collections.deque = collections.deque()
        self._finished: list[dict] = []

    def check(self) -> None:
        pass

    def put(self, b: int, layer: nn.Module, inputs, depth: int) -> None:
        self._items.append((b, layer, inputs))
        while len(self._items) > depth:
            self._run_oldest()

    def wait_empty(self) -> None:
        while self._items:
            self._run_oldest()

    def take(self) -> list[dict]:
        out, self._finished = self._finished, []
        return out

    def _run_oldest(self) -> None:
        b, layer, inputs = self._items.popleft()
        self._finished.append(self._solve(b, layer, inputs, self.load))
