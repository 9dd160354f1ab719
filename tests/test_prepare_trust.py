"""Issue 21, prepared data: trust nothing in <prepared_dir> we did not write, and bound the work a
recipe's inputs can ask for. The .current pointer names one real directory inside prepared_dir
(not /etc, not ../x, not a symlink); an index that lists fewer (or no) files than the sources
resolve to is stale, never 'fresh'; writes there follow no planted symlink; a chat template that
loops without bound is refused per record within seconds; the jsonl line check is linear."""
from __future__ import annotations

import time
from pathlib import Path

from meshbake.runtime import prepare as PR


# ------------------------------------------------------------------- jsonl line check: linear
def _check_seconds(path: Path) -> float:
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        PR._check_text(path)
        best = min(best, time.perf_counter() - t)
    return best


def test_the_jsonl_line_check_is_linear_in_line_length(tmp_path, monkeypatch):
    """One n-byte line read in c-byte chunks: re-joining the line so far per chunk copied n^2 / 2c
    bytes. With 64 KiB chunks that is 2 GiB for 16 MiB (seconds), against 128 MiB for 4 MiB: the
    ratio 16 MiB / 4 MiB is ~16 when quadratic, ~4 when linear. A ratio, not an absolute time."""
    monkeypatch.setattr(PR, "_CHUNK", 64 << 10)
    times = {}
    for mb in (4, 16):
        p = tmp_path / f"long{mb}.jsonl"
        p.write_text('{"text": "' + "a" * (mb << 20) + '"}\n{"text": "b"}\n')
        times[mb] = _check_seconds(p)
        p.unlink()
    assert times[16] < 6 * times[4] + 0.3, times
