"""A reader of a FIFO in a thread, as `cat FIFO` would be, for the tests of outputs that are streams."""
from __future__ import annotations

import threading
from pathlib import Path


def read_fifo_in_thread(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    """Start reading `fifo` to its end; once the thread is joined, the returned list holds what it read."""
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as stream:
            received.append(stream.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, received
