"""Running a command as cron's user would: as root a mode 000 folder is still readable, so tests that need a
folder the command cannot list run it without CAP_DAC_OVERRIDE."""
from __future__ import annotations

import os


def without_file_permission_override() -> list[str]:
    """A command prefix that drops every capability when the tests run as root (nothing otherwise)."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
