"""What the retriever's child processes do at start: take a name ``ps`` and ``top`` show, and die with the server.

``drzero serve-retriever`` starts its search worker, and with ``--fronts N`` its HTTP fronts, as spawned
``multiprocessing`` children, which all look alike (``python -c "from multiprocessing.spawn import spawn_main..."``).
Each names itself (``drzero-worker``, ``drzero-front-2``: ``/proc/PID/comm``), so an operator, and
``benchmarks/search_step.py``'s CPU column, can tell them apart.

A front must not outlive its server (a kill -9 or the OOM killer would leave it holding the port): it asks the
kernel for SIGTERM when the server dies (``PR_SET_PDEATHSIG``, Linux; ``drzero.services.supervisor`` does the same
for the services it starts). The worker needs no signal: the end of its pipe to the server stops it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15  # <linux/prctl.h>
_COMM_BYTES = 15  # the kernel keeps 16 bytes of a name, its terminating NUL included


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_this_process(name: str) -> None:
    """Show this process as ``name`` (at most 15 bytes are kept) in ``/proc/PID/comm``, ``ps`` and ``top``."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:_COMM_BYTES]), 0, 0, 0)


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent ``parent`` dies (kill -9 included); exit now if it already has."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was made: no one would signal us
        os._exit(1)
