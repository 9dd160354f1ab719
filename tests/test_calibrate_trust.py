"""`meshbake calibrate --cluster PROFILE` reads a profile someone handed over (clusters/*.yaml of a
shared repo, a wiki paste). On main 111e863 it read it with yaml.safe_load, outside the recipe's
hardened loader, and passed its gpus_per_node to torchrun's --nproc-per-node unchecked: a profile
saying 100000 started that many processes on the user's machine; a list or a !!python tag was a
traceback (exit 70). Each case here is refused before any process starts (exit 2, one line)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import cli, no_hang

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text,says", [
    ("device: cpu\ngpus_per_node: 100000\n", "gpus_per_node 100000 is not a process count from 1 to 1024"),
    ("device: cpu\ngpus_per_node: '4; reboot'\n", "is not a process count"),
    ("device: cpu\ngpus_per_node: true\n", "is not a process count"),
    ("- device: cpu\n- gpus_per_node: 4\n", "a YAML mapping"),
    ("device: !!python/object/apply:os.system ['touch PWNED']\ngpus_per_node: 2\n", "tag"),
    ("device: cpu\ngpus_per_node: 2\n" + BOMB, "alias"),
    ("device: cpu\ndevice: cuda\ngpus_per_node: 2\n", "duplicate key"),
], ids=["nproc-huge", "nproc-string", "nproc-bool", "a-list", "python-tag", "alias-bomb", "duplicate-key"])
def test_a_hostile_base_profile_is_refused_before_any_launch(tmp_path: Path, text, says):
    prof = tmp_path / "handed.yaml"
    prof.write_text(text)
    with no_hang(60):                 # the refusal is immediate; a launch of 2 ranks is not
        r = cli("calibrate", "--cluster", str(prof), cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0] and "handed.yaml" in lines[0], (r.returncode, r.stderr)
    assert not (tmp_path / "PWNED").exists()


def test_an_nproc_out_of_range_is_refused(tmp_path: Path):
    r = cli("calibrate", "--nproc", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--nproc 0 is not a process count" in r.stderr, r
