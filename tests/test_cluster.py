"""`vsam prep-pose --backend dask` against a real cluster on 127.0.0.1 (`dask scheduler` and `dask worker`
processes): no worker at all, every worker killed, the scheduler killed, a worker killed under its nanny."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import fixture_set
from fixture_set import copy_photos
from pose_prep import lock
from pose_prep.cluster import CONNECT_SECONDS, IDENTITY_SECONDS, ClusterError, _close, _Watch
from pose_prep.prep import PrepError, PrepOptions, catalog_problems, run
from pose_prep.shard_format import count_live, open_index

DASK = str(Path(sys.executable).with_name("dask"))
VSAM = str(Path(sys.executable).with_name("vsam"))


class Cluster:
    """A `dask scheduler` on 127.0.0.1 and `dask worker` processes, each in its own process group."""

    def __init__(self, folder: Path):
        self.folder, self.workers = folder, []
        scheduler_file = folder / "scheduler.json"
        self.scheduler = self._start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(scheduler_file)])
        try:
            self.address = self._read_address(scheduler_file)
        except BaseException:
            self.kill(self.scheduler)
            raise

    def _read_address(self, scheduler_file: Path) -> str:
        """The scheduler writes its file in place, not atomically: until it parses, it is still being written
        (seen empty under load)."""
        deadline = time.monotonic() + 60
        while True:
            assert self.scheduler.poll() is None and time.monotonic() < deadline, "the scheduler did not start"
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.05)

    def _start(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def add_worker(self, nanny: bool) -> subprocess.Popen:
        worker = self._start([DASK, "worker", self.address, "--nthreads", "1", "--no-dashboard",
                              "--nanny" if nanny else "--no-nanny"])
        self.workers.append(worker)
        self._wait_for_workers(sum(process.poll() is None for process in self.workers))
        return worker

    def _wait_for_workers(self, count: int) -> None:
        """Until the scheduler knows `count` workers: a worker process takes seconds to import `distributed` on a
        loaded machine, longer than the `--worker-wait` of the tests, which would then stop before it joined."""
        from distributed import Client
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(count, timeout=120)

    def kill(self, process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            self.kill(process)


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """48 real photos of the fixture set: enough for a run that lasts a few seconds on one worker thread."""
    names = sorted(path.name for path in fixture_set.PHOTOS.glob("*.jpg"))[:48]
    return copy_photos(tmp_path_factory.mktemp("cluster") / "img", names)


def start_prep(images: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--no-progress",
                             "--detector", "blazepose", "--backend", "dask", "--scheduler", address,
                             "--shard-size", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def live(out: Path) -> int:
    try:
        with open_index(out, readonly=True) as connection:
            return count_live(connection)
    except Exception:   # not created yet
        return 0


def wait_for_commits(process: subprocess.Popen, out: Path, timeout: float = 120) -> int:
    """Until the run has committed a shard (it is then in the middle of its detections)."""
    deadline = time.monotonic() + timeout
    while (committed := live(out)) == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no shard committed"
        time.sleep(0.05)
    return committed


def report(out: Path) -> dict:
    return json.loads((out / "reports" / "latest.json").read_text())


def finish_locally(images: Path, out: Path, committed: int) -> None:
    """A local rerun does exactly what the stopped run left, and every image is live once."""
    rerun = run(PrepOptions(images=images, out=out, detector="blazepose", shard_size=2, progress=False))
    assert rerun.exit_code == 0 and rerun.counts["new"] == 48 - committed and rerun.counts["unchanged"] == committed
    assert catalog_problems(out, images) == []


def test_a_cluster_without_workers_stops_after_the_wait_and_says_so_meanwhile(cluster, catalog, tmp_path, capsys):
    out = tmp_path / "shards"
    started = time.monotonic()
    with pytest.raises(PrepError, match=rf"^no Dask worker at {cluster.address} for 3 s \(they all left, or none was "
                                        r"started\) after 0 of 48 images: stopped; 0 items of this run are committed"):
        run(PrepOptions(images=catalog, out=out, detector="blazepose", backend="dask", scheduler=cluster.address,
                        worker_wait=3, progress=False))
    assert time.monotonic() - started < 30
    assert f"vsam prep-pose: no Dask worker at {cluster.address}: waiting up to 3 s more" in capsys.readouterr().err
    assert not lock.is_locked(out)
    assert report(out)["status"] == "failed" and report(out)["stored"] == 0


def test_every_worker_killed_mid_run_stops_the_run_with_one_line_and_what_was_committed(cluster, catalog, tmp_path):
    out = tmp_path / "shards"
    worker = cluster.add_worker(nanny=False)
    prep = start_prep(catalog, out, cluster.address, "--worker-wait", "3")
    wait_for_commits(prep, out)
    assert prep.poll() is None
    cluster.kill(worker)
    _, stderr = prep.communicate(timeout=120)
    assert prep.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"vsam prep-pose: no Dask worker at {cluster.address} for 3 s") and "Traceback" not in stderr
    committed = live(out)
    assert f"stopped; {committed} items of this run are committed and the next run does only the rest" in last
    assert (report(out)["status"], report(out)["stored"], report(out)["items_total"]) == ("failed", committed, committed)
    assert not lock.is_locked(out)
    finish_locally(catalog, out, committed)


def test_the_scheduler_killed_mid_run_stops_the_run_at_once_with_one_line(cluster, catalog, tmp_path):
    out = tmp_path / "shards"
    cluster.add_worker(nanny=False)
    prep = start_prep(catalog, out, cluster.address)
    wait_for_commits(prep, out)
    assert prep.poll() is None
    cluster.kill(cluster.scheduler)
    killed = time.monotonic()
    _, stderr = prep.communicate(timeout=120)
    assert time.monotonic() - killed < 15         # not the client's 30 s of reconnecting
    assert prep.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    committed = live(out)
    assert lines == [f"vsam prep-pose: lost the Dask scheduler at {cluster.address} (it stopped, or the network to "
                     f"it did): stopped; {committed} items of this run are committed and the next run does only the "
                     "rest"], stderr
    assert 0 < committed < 48
    assert (report(out)["status"], report(out)["stored"], report(out)["items_total"]) == ("failed", committed, committed)
    finish_locally(catalog, out, committed)


def test_the_watch_asked_just_after_the_scheduler_died_says_so_within_seconds(cluster):
    """The moment between the scheduler's death and the client noticing it: asking then for the workers opened a
    new connection that distributed retried for 30 s (CI saw the run stop after 30 s instead of at once)."""
    from distributed import Client

    cluster.add_worker(nanny=False)
    with Client(cluster.address, timeout=CONNECT_SECONDS) as client:
        watch = _Watch(client, cluster.address, worker_wait=120, notify=print, total=1)
        assert watch.threads == 1
        cluster.kill(cluster.scheduler)
        asked = time.monotonic()
        with pytest.raises(ClusterError, match="^lost the Dask scheduler at "):
            for _ in range(2):          # the first may still find the client's connection open
                watch.check()
        assert time.monotonic() - asked < IDENTITY_SECONDS + 3
        _close(client, lost=True)       # as the run does: without waiting out the client's reconnecting


def test_a_scheduler_that_does_not_answer_is_waited_for_worker_wait_seconds_then_named(cluster):
    """SIGSTOP: the connection stays open and nothing answers (asking for the workers used to wait for good).
    One that answers again within the wait resumes the run; a later silence is counted from its own start."""
    from distributed import Client

    cluster.add_worker(nanny=False)
    notices = []
    wait = IDENTITY_SECONDS + 1
    silent = (f"the Dask scheduler at {cluster.address} has not answered for {IDENTITY_SECONDS:g} s: waiting up to "
              f"1 s more (0 of 8 images done)")
    with Client(cluster.address, timeout=CONNECT_SECONDS) as client:
        watch = _Watch(client, cluster.address, worker_wait=wait, notify=notices.append, total=8)
        try:
            os.kill(cluster.scheduler.pid, signal.SIGSTOP)
            watch.check()                       # no answer yet: a notice, and the run goes on
            assert notices == [silent]
            os.kill(cluster.scheduler.pid, signal.SIGCONT)
            watch.check()
            assert notices[1:] == [f"the Dask scheduler at {cluster.address} answers again: going on"]
            os.kill(cluster.scheduler.pid, signal.SIGSTOP)
            asked = time.monotonic()
            watch.check()
            assert notices[2:] == [silent]
            with pytest.raises(ClusterError, match=rf"^the Dask scheduler at {cluster.address} has not answered for "
                                                   rf"{wait:g} s \(it is stuck, or the network to it is\) after 0 "
                                                   r"of 8 images$"):
                watch.check()
            assert time.monotonic() - asked < 3 * IDENTITY_SECONDS
        finally:
            os.kill(cluster.scheduler.pid, signal.SIGCONT)


def test_a_worker_killed_under_its_nanny_is_restarted_and_every_image_is_stored_once(cluster, catalog, tmp_path):
    out = tmp_path / "shards"
    nanny = cluster.add_worker(nanny=True)
    prep = start_prep(catalog, out, cluster.address)
    wait_for_commits(prep, out)
    worker = psutil.Process(nanny.pid).children()[0]
    assert prep.poll() is None
    worker.kill()                                   # SIGKILL to the worker process; its nanny starts another
    _, stderr = prep.communicate(timeout=180)
    assert prep.returncode == 0, stderr
    assert [p.pid for p in psutil.Process(nanny.pid).children()] not in ([], [worker.pid])   # restarted
    assert report(out)["stored"] == 48 and catalog_problems(out, catalog) == []
