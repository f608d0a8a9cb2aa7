"""Pause points for the kill tests: inert unless an environment variable names one.

The tests (tests/cli/test_kill.py) start a subprocess paused at a chosen point between the
writes of a multi-file output, kill it there and check that no half output survives.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

#: Environment variables of the test-only pause hook (see :func:`pause_point`).
PAUSE_AT_ENV = "FASTDIFF_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "FASTDIFF_TEST_PAUSE_FILE"


def pause_point(name: str) -> None:
    """A hook for kill tests, inert unless ``$FASTDIFF_TEST_PAUSE_AT`` is ``name``: then it
    creates ``$FASTDIFF_TEST_PAUSE_FILE`` (so the test knows the process got here) and sleeps,
    waiting to be killed. Placed between the writes of multi-file outputs."""
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    Path(os.environ[PAUSE_FILE_ENV]).write_text(str(os.getpid()))
    time.sleep(600)
