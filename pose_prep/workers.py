"""Worker processes that never outlive the process that started them.

`kill -9` of a parent (what the OOM killer does) runs none of its clean-up: loky's workers then
wait for work forever (and keep loky's resource trackers alive with them), ~300 MB each, and a
nightly cron job piles them up. Each worker therefore runs a watchdog thread, started by the pool's
initializer, that polls its parent pid and ends the worker when the parent is gone.

Why polling and not Linux's `prctl(PR_SET_PDEATHSIG)`: that signal fires when the *thread* that
forked the worker ends, and loky forks workers from its executor-manager thread (a respawn after a
crash, for instance), so a worker could be killed while its parent lives; it is also Linux-only. A
poll of `os.getppid()` every `POLL_SECONDS` costs nothing measurable and works on every POSIX system.
"""
from __future__ import annotations

import os
import threading
import time
from functools import partial

POLL_SECONDS = 0.5
EXIT_ORPHANED = 70   # a worker's own code when its parent is gone (no one reads it: its parent is dead)


def exit_with_parent(parent_pid: int, *_ignored) -> None:
    """Pool initializer (also a DataLoader `worker_init_fn`, whose worker id lands in `_ignored`):
    end this process within POLL_SECONDS once `parent_pid` is no longer its parent (the parent
    died and the process was re-parented to init or a subreaper)."""
    if os.getppid() != parent_pid:   # the parent died before this worker got here
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=_watch, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    # os._exit, not sys.exit: the main thread may be inside a detector call or blocked on a queue,
    # and no clean-up is owed to a parent that is gone.
    os._exit(EXIT_ORPHANED)


def loader_worker_init():
    """`worker_init_fn` for a torch DataLoader started by this process."""
    return partial(exit_with_parent, os.getpid())


def loky_parallel(n_jobs: int, **options):
    """joblib.Parallel on loky whose workers end with this process (see the module docstring)."""
    from joblib import Parallel

    return Parallel(n_jobs=n_jobs, backend="loky", initializer=exit_with_parent, initargs=(os.getpid(),), **options)
