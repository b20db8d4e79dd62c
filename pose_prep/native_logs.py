"""Keep the detectors' native log lines out of the user's terminal.

mediapipe's C++ graph (absl logging) and TensorFlow Lite write straight to file descriptor 2, in
every process that builds or runs a BlazePose model, lines such as

    INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    W0000 00:00:1796142616.118999   10520 inference_feedback_manager.cc:114] Feedback manager requires ...

Neither GLOG_minloglevel nor TF_CPP_MIN_LOG_LEVEL reaches them (measured with mediapipe 0.10.21: the
same lines with both set), and Python's logging never sees them. So `quiet_native_logs()` points
fd 2 at a temporary file around the native calls and, afterwards, writes back everything that is not
such a line: an absl error (E..., F...) or anything Python printed meanwhile still reaches the
terminal, only later. `vsam -v` (or VSAM_VERBOSE=1, which worker processes inherit) leaves fd 2 alone.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

VERBOSE_ENV = "VSAM_VERBOSE"

# absl's INFO and WARNING lines ("I0000 hh:mm:ss.ffffff  thread file:line] message"), its notice that it
# was never initialised, and TensorFlow Lite's "INFO: ..." lines. ERROR and FATAL lines are kept.
NOISE = re.compile(rb"^(?:[IW]\d{4} [\d:.]+ +\d+ [^\]\s]+:\d+\] |INFO: |"
                   rb"WARNING: All log messages before absl::InitializeLog\(\) is called)")

_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None
_capture = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def drop_noise(data: bytes) -> bytes:
    """`data` without its native log lines (each a whole line)."""
    return b"".join(line for line in data.splitlines(keepends=True) if not NOISE.match(line))


@contextlib.contextmanager
def quiet_native_logs():
    """Native log lines written to fd 2 inside this block are dropped; everything else written there
    is written to the real fd 2 when the outermost block of any thread ends. Re-entrant and shared by
    threads (a threaded Dask worker): the first block in redirects, the last one out restores."""
    if verbose():
        yield
        return
    _enter()
    try:
        yield
    finally:
        _leave()


def _enter() -> None:
    global _depth, _saved_fd, _capture
    with _lock:
        if _depth == 0:
            _flush_python_streams()
            _capture = tempfile.TemporaryFile()
            _saved_fd = os.dup(2)
            os.dup2(_capture.fileno(), 2)
        _depth += 1


def _leave() -> None:
    global _depth, _saved_fd, _capture
    with _lock:
        _depth -= 1
        if _depth:
            return
        _flush_python_streams()
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
        _capture.seek(0)
        kept = drop_noise(_capture.read())
        _capture.close()
        _saved_fd = _capture = None
    if kept:
        _write_all(2, kept)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
