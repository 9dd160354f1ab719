"""Suite-wide pytest options.

--cpu-times: per test file, the CPU seconds spent (this process + every child process it waited
for: torchrun and its ranks, bash launch.sh, python -c ...), and the wall seconds. On a shared,
loaded machine wall time says little; CPU time is what a 2-core CI runner has to pay.
Daemons a test starts but does not wait for (the local Slurm cluster) are not counted.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict

import pytest

_CPU: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])


def pytest_addoption(parser):
    parser.addoption("--cpu-times", action="store_true", help="print CPU and wall seconds per test file")


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not item.config.getoption("--cpu-times"):
        yield
        return
    cpu, wall = _cpu(), time.perf_counter()
    yield                               # setup (module fixtures land on the file's first test), call, teardown
    acc = _CPU[item.nodeid.split("::")[0]]
    acc[0] += _cpu() - cpu
    acc[1] += time.perf_counter() - wall


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--cpu-times") or not _CPU:
        return
    tr = terminalreporter
    tr.section("CPU seconds per file (this process + waited-for children)")
    for path, (cpu, wall) in sorted(_CPU.items(), key=lambda kv: -kv[1][0]):
        tr.write_line(f"{cpu:8.1f} cpu {wall:8.1f} wall  {path}")
    tr.write_line(f"{sum(c for c, _ in _CPU.values()):8.1f} cpu {sum(w for _, w in _CPU.values()):8.1f} wall  total")
