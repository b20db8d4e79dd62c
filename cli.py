"""`vsam`: the command line. Each command imports its machinery lazily, so `vsam --help` is quick
and the training commands never import a pose detector (a GPU machine without mediapipe trains)."""
from __future__ import annotations

import sys

import click

# Exit codes, shared by every command.
EXIT_OK = 0
EXIT_FAILED = 1          # the job could not do what was asked (nothing processed, --strict, ...)
EXIT_USAGE = 2           # click's own code for bad options
EXIT_BUSY = 75           # another run holds the lock (EX_TEMPFAIL: try again later)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vsam")
def main() -> None:
    """vsam: pose-guided attention for multi-label fashion image classification."""


# --- pose (pose_prep) --------------------------------------------------------------------------


# --- prep-pose and shards (pose_prep) ---------------------------------------------------------


# --- train (vsam_train) -----------------------------------------------------------------------


# --- eval, predict, explain, export, experiment (vsam_train) ----------------------------------


if __name__ == "__main__":
    sys.exit(main())
