"""Detection on a Dask cluster (`vsam prep-pose --backend dask`), watched so that the run never hangs.

Images go to the cluster in tasks of `IMAGES_PER_TASK` (only paths travel: the workers read the files),
with a bounded number of tasks in flight, through distributed's own futures (`Client.submit`,
`distributed.wait`): the parent sees each result once, in completion order, and a task that was on a
worker that died is run again by the scheduler (a nanny restarts the worker), so a killed worker
costs time, never an image.

What the parent watches, every `POLL_SECONDS` without a result:

* **workers**: a cluster with no worker (all left, or none was started) holds the tasks forever. The
  run says so on stderr at once and then every `NOTICE_SECONDS` (`no Dask worker at ADDRESS: waiting
  up to 120 s for one`), and stops when none has come back within `worker_wait` seconds
  (`--worker-wait`, default `DEFAULT_WORKER_WAIT`); a worker that comes back in time resumes the run;
* **the scheduler**: when the connection is lost, distributed cancels every future; the run stops at
  once, or within `IDENTITY_SECONDS` if it was asking for the workers (it does not wait for the client's
  own 30 s of reconnecting); a scheduler that keeps the connection but does not answer (stuck, or a
  network that drops packets) is given `worker_wait` seconds too;
* **tasks that cannot run** (a worker without vsam, or a task that killed three workers in a row):
  the run stops and names the error.

Each of these is a `ClusterError` with a one-line message; prep-pose commits what it has received
before it stops, so the next run does only the rest.
"""
from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager
from typing import Callable, Iterator

from .prep_worker import Processed, Settings, Task, process

POLL_SECONDS = 2.0
NOTICE_SECONDS = 15.0
DEFAULT_WORKER_WAIT = 120.0      # a nanny restarts a killed worker in seconds; a cluster with none for 2 min is down
IMAGES_PER_TASK = 4
CONNECT_SECONDS = 30
IDENTITY_SECONDS = 5.0           # a live scheduler answers in milliseconds; a dead one is noticed by then


class ClusterError(Exception):
    """The cluster cannot go on; str() is one line naming the scheduler and what happened."""


def process_batch(tasks: list[Task], settings: Settings) -> list[Processed]:
    """One Dask task: several images, so that the scheduler's per-task cost stays small beside detection."""
    return [process(task, settings) for task in tasks]


def _stderr(line: str) -> None:
    print(f"vsam prep-pose: {line}", file=sys.stderr, flush=True)


def map_on_cluster(tasks: list[Task], settings: Settings, address: str, jobs: int = 1,
                   worker_wait: float = DEFAULT_WORKER_WAIT,
                   notify: Callable[[str], None] = _stderr) -> Iterator[Processed]:
    """Results of `process` for every task, in completion order, computed on the cluster at `address`.
    `jobs` > 1: that many tasks in flight; else twice the cluster's threads. Raises ClusterError."""
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_SECONDS)
    except (OSError, ValueError) as error:    # unreachable, or not an address
        raise ClusterError(f"--scheduler {address}: no Dask scheduler there ({error})") from None
    with _quiet_distributed():
        lost = False
        try:
            yield from _results(client, tasks, settings, address, jobs, worker_wait, notify)
        except ClusterError:
            lost = True
            raise
        finally:
            _close(client, lost)


def _results(client, tasks: list[Task], settings: Settings, address: str, jobs: int, worker_wait: float,
             notify: Callable[[str], None]) -> Iterator[Processed]:
    from distributed import wait

    batches = iter([tasks[i:i + IMAGES_PER_TASK] for i in range(0, len(tasks), IMAGES_PER_TASK)])
    watch = _Watch(client, address, worker_wait, notify, total=len(tasks))
    in_flight = jobs if jobs > 1 else None
    pending: set = set()
    more = True
    while True:
        while more and len(pending) < (in_flight or watch.in_flight()):
            batch = next(batches, None)
            if batch is None:
                more = False
            else:
                pending.add(client.submit(process_batch, batch, settings, pure=False))
        if not pending:
            return
        try:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
        except TimeoutError:
            watch.check()
            continue
        except CancelledError:
            raise watch.scheduler_lost() from None
        for future in done:
            results = _result(future, watch, address)
            watch.received(len(results))
            yield from results


def _result(future, watch: "_Watch", address: str) -> list[Processed]:
    """The result of a finished task. Its worker may die before the result is fetched: distributed then runs
    the task again and `result()` waits for it, so wait in POLL_SECONDS steps watching the cluster, as for any
    pending task (a bare `result()` would hang for good once the last worker is gone). A broken connection
    while fetching is the scheduler's if the watch says so, else the fetch is tried again."""
    from distributed.comm import CommClosedError

    while True:
        try:
            return future.result(timeout=POLL_SECONDS)
        except (TimeoutError, CommClosedError):
            watch.check()
        except CancelledError:
            raise watch.scheduler_lost() from None
        except Exception as error:  # noqa: BLE001 - process() catches an image's own errors: this is the cluster's
            text = " ".join(str(error).split())
            raise ClusterError(f"the Dask cluster at {address} could not run a task ({type(error).__name__}: "
                               f"{text}); every worker needs vsam and the detector's extra installed") from None


class _Watch:
    """The cluster's workers, looked at when no result came for POLL_SECONDS."""

    def __init__(self, client, address: str, worker_wait: float, notify: Callable[[str], None], total: int):
        self.client, self.address, self.worker_wait, self.notify = client, address, worker_wait, notify
        self.total, self.done = total, 0
        self.threads = 0
        self.none_since: float | None = None
        self.unanswered_since: float | None = None
        self.noticed = 0.0
        self.check()

    def in_flight(self) -> int:
        return max(2, 2 * self.threads)

    def received(self, count: int) -> None:
        self.done += count
        self.unanswered_since = None     # results flow: a later silence is a new one, not this one's sequel

    def _workers(self) -> dict | None:
        """The scheduler's workers, None if it did not answer within IDENTITY_SECONDS but the client still
        holds its connection. Not `Client.scheduler_info()`: asked in the moment between the scheduler's death
        and the client noticing it, that opens a new connection, which distributed retries for the client's
        whole connect timeout (30 s) and then answers with its cached, stale, list of workers."""
        if self.client.status != "running":      # "connecting": the connection is lost, it tries again
            raise self.scheduler_lost()
        try:
            identity = self.client.sync(self.client.scheduler.identity, n_workers=-1,
                                        callback_timeout=IDENTITY_SECONDS)
        except TimeoutError:
            if self.client.status != "running":
                raise self.scheduler_lost() from None
            return None
        except (OSError, CancelledError):
            raise self.scheduler_lost() from None
        return identity.get("workers", {})

    def _no_answer(self, now: float) -> None:
        """A scheduler that holds its connection but does not answer (stuck, or a network that drops packets
        without closing the connection) is given `worker_wait` seconds, as a cluster without workers is."""
        if self.unanswered_since is None:
            self.unanswered_since = now - IDENTITY_SECONDS
            self.notify(f"the Dask scheduler at {self.address} has not answered for {IDENTITY_SECONDS:g} s: waiting "
                        f"up to {max(0.0, self.worker_wait - IDENTITY_SECONDS):.0f} s more ({self.done} of "
                        f"{self.total} images done)")
        if now - self.unanswered_since >= self.worker_wait:
            raise ClusterError(f"the Dask scheduler at {self.address} has not answered for {self.worker_wait:g} s "
                               f"(it is stuck, or the network to it is) after {self.done} of {self.total} images")

    def scheduler_lost(self) -> ClusterError:
        return ClusterError(f"lost the Dask scheduler at {self.address} (it stopped, or the network to it did)")

    def check(self) -> None:
        workers = self._workers()
        now = time.monotonic()
        if workers is None:
            self._no_answer(now)
            return
        if self.unanswered_since is not None:
            self.notify(f"the Dask scheduler at {self.address} answers again: going on")
            self.unanswered_since = None
        self.threads = sum(w.get("nthreads", 1) for w in workers.values())
        if workers:
            if self.none_since is not None:
                self.notify(f"{len(workers)} Dask worker(s) at {self.address} again: going on")
            self.none_since = None
            return
        if self.none_since is None:
            self.none_since, self.noticed = now, 0.0
        waited = now - self.none_since
        if waited >= self.worker_wait:
            raise ClusterError(f"no Dask worker at {self.address} for {self.worker_wait:g} s (they all left, or none "
                               f"was started) after {self.done} of {self.total} images")
        if self.noticed == 0.0 or now - self.noticed >= NOTICE_SECONDS:
            self.noticed = now
            self.notify(f"no Dask worker at {self.address}: waiting up to {self.worker_wait - waited:.0f} s more "
                        f"for one ({self.done} of {self.total} images done)")


def _close(client, lost: bool) -> None:
    """Close the client; after losing the scheduler, without waiting out its reconnection attempts."""
    try:
        client.close(timeout=2 if lost else None)
    except Exception:  # noqa: BLE001 - the run's own error says what happened; closing is best effort
        pass


class _QuietDistributed(logging.Filter):
    """Drops distributed's log records on their way to its stderr handler (its logger does not propagate).
    The run reports what matters of the cluster itself, in one line each; losing the scheduler makes the
    client log a cancelled reconnection as a 30-line ERROR, from its own thread, while or after it closes.
    `vsam -v` (VSAM_VERBOSE=1) lets them through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _AbandonedFetch(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved ... AllExit": a `result(timeout=...)` that timed
    out leaves distributed's fetch task behind, which ends with AllExit when the client closes and is logged
    when it is garbage-collected, at any later time. Nothing else of asyncio's is touched."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ != "AllExit"


_ABANDONED_FETCH = _AbandonedFetch()


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    from .native_logs import verbose

    if not verbose():
        logging.getLogger("asyncio").addFilter(_ABANDONED_FETCH)   # once; kept for the process's life
    handlers = [] if verbose() else logging.getLogger("distributed").handlers
    quiet = _QuietDistributed()
    for handler in handlers:
        handler.addFilter(quiet)
    lost = False
    try:
        yield
    except ClusterError:
        lost = True
        raise
    finally:
        if not lost:   # after a loss the client's thread may still log: keep them out for this process's life
            for handler in handlers:
                handler.removeFilter(quiet)
