"""tests/dist/watchdog.py, the per-case watchdog of the multi-case torchrun workers: a case past its
time ends the process with exit 3 and the case's name on stderr; a case within it does not. A bare
interpreter (the module imports no torch): ~0.1 s of CPU. The same watchdog ending a real gloo
deadlock (rank 0 in a recv never sent, rank 1 in the barrier after the case) was run once by hand:
both ranks exited 3 naming the case, 20 s after it started (MESHBAKE_TEST_CASE_TIMEOUT=20)."""
import subprocess
import sys

from tests.helpers import ROOT

CODE = """
import time
from tests.dist import watchdog
with watchdog.case("quick", 5):
    time.sleep(0.05)
print("quick done", flush=True)
with watchdog.case("stuck-case", 1):
    time.sleep(60)                 # stands for a rank blocked in a collective
print("not reached", flush=True)
"""


def test_a_case_past_its_time_ends_the_rank_naming_the_case():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 3, (p.returncode, p.stdout, p.stderr[-2000:])
    assert p.stdout.split("\n")[0] == "quick done" and "not reached" not in p.stdout
    assert "case 'stuck-case' still running on rank ? after 1 s" in p.stderr, p.stderr[-2000:]
    assert 'File "<string>", line 8 in <module>' in p.stderr, p.stderr[-2000:]     # the stuck thread's stack
