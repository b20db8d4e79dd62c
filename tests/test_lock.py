"""pose_prep.lock: one run per folder, released by the kernel when its holder ends."""
from __future__ import annotations

import multiprocessing
import time

from pose_prep import lock


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path):
    # A DataLoader worker is forked from the trainer: it must not hold the run folder's lock, or a
    # `--resume` right after a kill -9 of the trainer would find the folder busy until it ends.
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    with lock.exclusive(tmp_path, lock.TRAIN_LOCK_NAME, "vsam train"):
        child = fork.Process(target=lambda: (running.set(), time.sleep(60)))
        child.start()
        assert running.wait(30) and lock.is_locked(tmp_path, lock.TRAIN_LOCK_NAME)
    try:
        assert child.is_alive() and not lock.is_locked(tmp_path, lock.TRAIN_LOCK_NAME)
    finally:
        child.kill()
        child.join()


def test_two_lock_names_in_one_folder_are_independent(tmp_path):
    with lock.exclusive(tmp_path), lock.exclusive(tmp_path, lock.TRAIN_LOCK_NAME, "vsam train"):
        assert lock.is_locked(tmp_path) and lock.is_locked(tmp_path, lock.TRAIN_LOCK_NAME)
    assert not lock.is_locked(tmp_path) and not lock.is_locked(tmp_path, lock.TRAIN_LOCK_NAME)
