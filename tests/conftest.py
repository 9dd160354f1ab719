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


# ------------------------------------------------------------- shared by several test files
@pytest.fixture(scope="session")
def model_weights(tmp_path_factory) -> dict[str, str]:
    """model_type -> a folder written by save_pretrained (tests/test_models.py write_weights)."""
    from tests.test_models import write_weights

    return write_weights(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama_weights(tmp_path_factory) -> str:
    """compiler/catalog/tiny-llama.json written by save_pretrained (tests/test_parity.py write_weights)."""
    from tests.test_parity import write_weights

    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def world4(tmp_path_factory, model_weights, tiny_llama_weights) -> dict:
    """The one world-4 torchrun of test_models, test_ep_mesh, test_init_parity and test_parity
    (tests/world4.py), run once for whichever of them are collected."""
    from tests.world4 import run

    return run(tmp_path_factory.mktemp("world4"), {**model_weights, "tiny-llama": tiny_llama_weights})
