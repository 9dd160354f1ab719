"""A per-case watchdog for the test workers that run many cases in one torchrun (tests/dist/worker.py,
packed_worker.py, lora_worker.py main_many): a case that hangs (a collective one rank never joins,
a rank blocked forever) ends the launch after CASE_TIMEOUT_S with the case's name and every thread's
stack on stderr, instead of the whole launch sitting until the test's 900 s subprocess timeout and
failing with nothing said about which case hung.

    with watchdog.case("train-llama"):
        ...

A daemon thread looks at the running case's deadline once a second; past it, it writes the case's
name, this rank and the stacks (faulthandler) to stderr and os._exit(3)s the rank: torchrun then
stops the other ranks and tests/helpers.torchrun fails the test with that stderr. Nothing raised in
the main thread could do it: a rank blocked in a gloo wait sits in C++ (the GIL released), where no
exception reaches it; os._exit from another thread ends it. No torch import: the mechanism is tested
in a bare interpreter (tests/test_dist_watchdog.py).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager

# the slowest case (a 3-step world-4 train of a MoE family at dp 2 x tp 2) takes ~20 s of wall on
# an idle 2-core machine; 300 s leaves 15x for a loaded one and still ends a hang 10 minutes before
# the 900 s launch timeout. MESHBAKE_TEST_CASE_TIMEOUT (seconds) overrides it.
CASE_TIMEOUT_S = float(os.environ.get("MESHBAKE_TEST_CASE_TIMEOUT", "300"))

_running: list[tuple[str, float, float]] = []     # (name, deadline, timeout) of the case running now
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _watch() -> None:
    while True:
        time.sleep(1.0)
        with _lock:
            late = [c for c in _running if time.monotonic() > c[1]]
        if late:
            name, _, timeout = late[0]
            rank = os.environ.get("RANK", "?")
            print(f"\ntests/dist watchdog: case {name!r} still running on rank {rank} after {timeout:g} s "
                  f"(a hang: a collective not every rank joined?); this rank exits 3. Its threads:",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(3)


@contextmanager
def case(name: str, timeout_s: float | None = None):
    """Run the body as case `name`: this process exits 3 with the name if it is still in it after
    timeout_s (CASE_TIMEOUT_S by default)."""
    global _thread
    timeout = CASE_TIMEOUT_S if timeout_s is None else timeout_s
    entry = (name, time.monotonic() + timeout, timeout)
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="case-watchdog", daemon=True)
            _thread.start()
        _running.append(entry)
    try:
        yield
    finally:
        with _lock:
            _running.remove(entry)
