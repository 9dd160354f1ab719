"""Nothing is lost: export never deletes what it did not write (issue 9, finding 2), and a
checkpoint is verified against the digests written at save (finding 3).

One real checkpoint, made once per module: a 1-process gloo group (in this process) saves the
tiny-llama of a compiled plan through runtime.checkpoint.save (the same code the ranks run), so
export reads real DCP shards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import cli, compiled, one_process_group, tiny_recipe


def make_run(run: Path, keep: int = 3) -> Path:
    """A 1-process gloo group saves 3 steps of the plan's tiny-llama through checkpoint.save."""
    import torch
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.parallel import hf_config
    from meshbake.runtime.plan import load_plan
    from transformers import AutoModelForCausalLM

    b = compiled(tiny_recipe("integrity", 1, tp=None, checkpoint=None,
                             train={"micro_batch_size": 1, "global_batch_size": 1, "steps": 3}))
    run.mkdir(parents=True)
    (run / "plan.json").write_bytes(b.files["plan.json"])
    plan = load_plan(str(run / "plan.json"))
    with one_process_group(), torch.random.fork_rng():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(hf_config(plan.model.config), dtype=torch.float32)
        opt = torch.optim.AdamW(m.parameters())
        for step in (1, 2, 3):
            m(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
            opt.step()
            ck.save(run / "checkpoints", step, m, opt, {"step": step, "scheduler": {}}, keep=keep)
    return run


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """runs/runA with step-1..3 committed, a sibling run and a notes file beside it."""
    base = tmp_path_factory.mktemp("integrity")
    make_run(base / "runs/runA")
    (base / "runs/runB").mkdir()
    (base / "runs/runB/notes.txt").write_text("a sibling run\n")
    (base / "runs/notes.md").write_text("my notes\n")
    return base


def fresh(saved: Path, tmp: Path) -> Path:
    """A private copy of the saved tree (tests delete and corrupt things)."""
    shutil.copytree(saved, tmp / "w", symlinks=True)
    return tmp / "w"


def export(*args: str, cwd: Path):
    """`meshbake export ARGS` run in this process from cwd."""
    return cli("export", *args, cwd=cwd)


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ------------------------------------------------------------------- finding 2: export
def test_export_force_onto_the_runs_parent_or_itself_deletes_nothing(saved, tmp_path):
    """The issue's cases: `export runs/runA -o runs --force` deleted runA, a sibling run and a
    notes file; `-o runs/runA --force` its own source; -o inside the run or through a symlink
    to it is the same thing."""
    w = fresh(saved, tmp_path)
    (w / "link").symlink_to(w / "runs")
    before = tree(w / "runs")
    for out in ("runs", "runs/runA", "runs/runA/checkpoints/hf", "link", "link/runA", "."):
        r = export("runs/runA", "-o", out, "--force", cwd=w)
        assert r.returncode == 3 and "Traceback" not in r.stderr, (out, r.stderr)
        assert "the run dir" in r.stderr and "give an -o outside the run" in r.stderr, (out, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert tree(w / "runs") == before, out


def test_export_force_replaces_only_a_previous_export(saved, tmp_path):
    w = fresh(saved, tmp_path)
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = json.loads((w / "hf/meshbake-export.json").read_text())
    assert "config.json" in marker["files"] and marker["step"] == 3
    assert export("runs/runA", "-o", "hf", "--step", "2", "--force", cwd=w).returncode == 0
    r = export("runs/runA", "-o", "hf9", "--step", "9", cwd=w)      # a step that was never committed
    assert r.returncode == 3 and "holds no committed step-9; pass --step one of [1, 2, 3]" in r.stderr, r.stderr
    assert not (w / "hf9").exists()
    assert json.loads((w / "hf/meshbake-export.json").read_text())["step"] == 2
    (w / "hf/notes.txt").write_text("mine\n")           # a user file: no longer only the export's
    (w / "mine").mkdir()
    (w / "mine/data.bin").write_text("x")
    for out, words in (("hf", "not a previous meshbake export"), ("mine", "not a previous meshbake export"),
                       ("mine/data.bin", "not a directory")):
        r = export("runs/runA", "-o", out, "--force", cwd=w)
        assert r.returncode == 3 and words in r.stderr and "Traceback" not in r.stderr, (out, r.stderr)
    assert (w / "hf/notes.txt").is_file() and (w / "mine/data.bin").is_file()
    r = export("runs/runA", "-o", "mine", cwd=w)         # without --force: not empty
    assert r.returncode == 3 and "pass --force" in r.stderr


def test_a_stale_tmp_with_user_files_is_never_deleted(saved, tmp_path):
    w = fresh(saved, tmp_path)
    (w / "hf.tmp").mkdir()
    (w / "hf.tmp/thesis.tex").write_text("years of work\n")
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 3 and "hf.tmp" in r.stderr and "did not write" in r.stderr, r.stderr
    assert (w / "hf.tmp/thesis.tex").read_text() == "years of work\n" and not (w / "hf").exists()
    # a killed export's tmp (the marker is written first) is removed and replaced
    shutil.rmtree(w / "hf.tmp")
    (w / "hf.tmp").mkdir()
    (w / "hf.tmp/meshbake-export.json").write_text('{"files": [], "step": 3}\n')
    (w / "hf.tmp/model.safetensors").write_bytes(b"half")
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 0 and not (w / "hf.tmp").exists() and (w / "hf/config.json").is_file(), r.stderr


# ---------------------------------------------------------- finding 3: checkpoint digests
def corrupt(step: Path, how: str) -> None:
    shard = sorted(step.glob("*.distcp"))[0]
    if how == "bitrot":            # the case: 40 KB in the middle of a shard, size unchanged
        data = bytearray(shard.read_bytes())
        mid = len(data) // 2
        data[mid - 20480:mid + 20480] = b"\xa5" * 40960     # not zeros: a shard may hold zero runs
        shard.write_bytes(bytes(data))
    elif how == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:-4096])
    elif how == "missing_shard":
        shard.unlink()
    elif how == "missing_train_state":
        (step / "train_state.json").unlink()
    elif how == "truncated_train_state":
        (step / "train_state.json").write_text((step / "train_state.json").read_text()[:10])
    elif how == "only_committed":
        for p in step.iterdir():
            if p.name != "COMMITTED":
                p.unlink()
    else:
        raise AssertionError(how)


HOW = ["bitrot", "truncated_shard", "missing_shard", "missing_train_state", "truncated_train_state",
       "only_committed"]


def test_saved_steps_carry_a_digest_of_every_file(saved):
    from meshbake.runtime.checkpoint import sha256_file, verify

    step = saved / "runs/runA/checkpoints/step-3"
    files = json.loads((step / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in step.iterdir()} - {"manifest.json", "COMMITTED"}
    assert set(files) == on_disk and {".metadata", "train_state.json", "__0_0.distcp"} <= on_disk
    shard = files["__0_0.distcp"]
    assert sha256_file(step / "__0_0.distcp") == (shard["bytes"], shard["sha256"]) and shard["bytes"] > 81920
    assert verify(step) is None


@pytest.mark.parametrize("how", HOW)
def test_a_corrupted_step_is_skipped_for_the_previous_one(saved, tmp_path, how):
    """find_resume (what every rank runs, here with the one-process check) falls back to
    step-2 with one line naming the step and the problem, and sets step-3 aside; export of the
    corrupted step is refused with the step to use instead."""
    from meshbake.runtime.checkpoint import find_resume, list_checkpoints, set_aside

    w = fresh(saved, tmp_path)
    root = w / "runs/runA/checkpoints"
    corrupt(root / "step-3", how)
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 3 and "step-3: failed verification" in r.stderr and "--step N (committed: [1, 2])" \
        in r.stderr, r.stderr
    assert not (w / "hf").exists()
    logs: list[str] = []
    assert find_resume(root, "auto", logs.append, discard=set_aside) == root / "step-2"
    assert len(logs) == 1 and logs[0].startswith("checkpoint step-3 failed verification: ") \
        and "trying step-2" in logs[0], logs
    word = {"bitrot": "corrupted", "truncated_shard": "truncated", "missing_shard": "missing",
            "missing_train_state": "train_state.json is missing",
            "truncated_train_state": "train_state.json is 10 bytes",
            "only_committed": "no manifest.json"}[how]
    assert word in logs[0], logs
    assert [s for s, _ in list_checkpoints(root)] == [1, 2] and (root / "step-3.corrupt").is_dir()


def test_pruning_keeps_the_step_just_saved(tmp_path):
    """keep: 2 after a resume from an older step: the old rule (drop all but the two highest
    step numbers) deleted the step just written when a higher-numbered one was on disk."""
    from meshbake.runtime.checkpoint import prunable

    root = tmp_path / "ck"
    for s in (10, 20, 30):
        (root / f"step-{s}").mkdir(parents=True)
        (root / f"step-{s}/COMMITTED").write_text(f"{s}\n")
    assert prunable(root, 20, 2) == [root / "step-10"]
    assert prunable(root, 20, 1) == [root / "step-10", root / "step-30"]
    assert prunable(root, 30, 2) == [root / "step-10"] and prunable(root, 30, 0) == []


def test_a_step_saved_before_digests_is_loaded_not_skipped(tmp_path):
    """A checkpoint of an older meshbake has no manifest.json: skipping it would restart the run
    at step 0 after an upgrade (and `keep` would prune the real checkpoints). It is whole when
    DCP's .metadata and train_state.json are there; one holding only COMMITTED is still refused.
    (.metadata is a real one: where it points is checked, manifest or not.)"""
    import pickle

    from meshbake.runtime.checkpoint import COMMITTED, verify
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    legacy, bare = tmp_path / "step-5", tmp_path / "step-6"
    for d in (legacy, bare):
        d.mkdir()
        (d / COMMITTED).write_text(f"{d.name[5:]}\n")
    md = Metadata(state_dict_metadata={}, storage_data={MetadataIndex("model.w"): _StorageInfo("__0_0.distcp", 0, 5)})
    (legacy / ".metadata").write_bytes(pickle.dumps(md))
    (legacy / "__0_0.distcp").write_bytes(b"shard")
    (legacy / "train_state.json").write_text('{"step": 5}\n')
    assert verify(legacy) is None
    assert "no manifest.json" in (verify(bare) or "")


# ----------------------------------------------------------- a checkpoint someone else wrote
class _Payload:
    """Unpickled, it touches a marker file: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch '{self.marker}'",)


def _rehash(step: Path, *names: str) -> None:
    """The attacker rewrites the manifest too: the digests vouch for nothing then."""
    from meshbake.runtime.checkpoint import MANIFEST, sha256_file

    m = json.loads((step / MANIFEST).read_text())
    for n in names:
        size, digest = sha256_file(step / n)
        m["files"][n] = {"bytes": size, "sha256": digest}
    (step / MANIFEST).write_text(json.dumps(m))


def _hostile_byte_entry(step: Path, marker: Path) -> None:
    """Replace one of the optimizer's byte entries (param_groups.0.lr) by a torch.save'd payload
    appended to its shard, and point the (legitimately pickled) metadata at it."""
    import io
    import pickle

    import torch

    md = pickle.loads((step / ".metadata").read_bytes())     # our own file: a trusted load
    key = next(k for k in md.storage_data if k.fqn == "optim.param_groups.0.lr")
    info = md.storage_data[key]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    shard = step / info.relative_path
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(buf.getvalue())
    md.storage_data[key] = type(info)(info.relative_path, offset, len(buf.getvalue()), info.transform_descriptors)
    (step / ".metadata").write_bytes(pickle.dumps(md))
    _rehash(step, ".metadata", info.relative_path)


def test_a_hostile_checkpoint_runs_no_code_at_export(saved, tmp_path):
    """DCP's own reader pickle.load()s .metadata: a checkpoint from someone else ran their code at
    `meshbake export`. Refused (exit 3, one line naming the global), nothing runs, and another
    step of the same run still exports."""
    import pickle

    w = fresh(saved, tmp_path)
    step, marker = w / "runs/runA/checkpoints/step-3", tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(step, ".metadata")
    from meshbake.runtime.checkpoint import verify
    assert verify(step) is None                              # the manifest matches: no help here
    r = export("runs/runA", "-o", "hf", cwd=w)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "step-3" in r.stderr and "posix.system" in r.stderr and "refusing to unpickle it (it could run code)" \
        in r.stderr, r.stderr
    assert not marker.exists() and not (w / "hf").exists()
    assert export("runs/runA", "-o", "hf2", "--step", "2", cwd=w).returncode == 0


@pytest.mark.parametrize("where", ["metadata", "byte entry"])
def test_resume_from_a_hostile_checkpoint_runs_no_code(saved, tmp_path, where):
    """The training side: checkpoint.load (runtime.train's resume) refuses a hostile .metadata and
    a hostile optimizer byte entry (DCP's planner torch.load()s those with weights_only=False);
    the run's other steps still load."""
    import pickle

    import torch
    from meshbake.runtime import checkpoint as ck
    from meshbake.runtime.errors import UserError
    from meshbake.runtime.parallel import hf_config
    from meshbake.runtime.plan import load_plan
    from transformers import AutoModelForCausalLM

    w = fresh(saved, tmp_path)
    step, marker = w / "runs/runA/checkpoints/step-3", tmp_path / "pwned"
    if where == "metadata":
        (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        _hostile_byte_entry(step, marker)
    words = "posix.system" if where == "metadata" else "optim.param_groups.0.lr is not plain data"
    plan = load_plan(str(w / "runs/runA/plan.json"))
    with one_process_group(), torch.random.fork_rng():
        m = AutoModelForCausalLM.from_config(hf_config(plan.model.config), dtype=torch.float32)
        opt = torch.optim.AdamW(m.parameters())
        with pytest.raises(UserError, match="refusing to unpickle") as e:
            ck.load(step, m, opt)
        assert words in str(e.value) and str(step) in str(e.value), e.value
        assert not marker.exists()
        assert ck.load(w / "runs/runA/checkpoints/step-2", m, opt)["step"] == 2
