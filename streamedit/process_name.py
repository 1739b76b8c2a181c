"""Names a process as `ps`, `top` and /proc/PID/comm show it, so an operator (and a benchmark) can tell the
engine from a media worker: multiprocessing's children otherwise all read `python`."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: prctl's option that sets the calling thread's name; on the main thread, the process's comm (at most 15 bytes)
_PR_SET_NAME = 15


def name_this_process(name: str) -> None:
    """Set this process's comm to `name` (cut to 15 bytes) on Linux; elsewhere, or where libc refuses, nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # a libc without prctl: the name is a convenience, never a failure
        pass
