"""The CLI as users run it: exit codes, all errors with their paths, no traceback.

Most tests call the CLI's main() in this process (tests.helpers.cli); three smoke tests run
`python -m meshbake.compiler` as a user's shell does: the exit code through sys.exit, a cold start."""
import json
import subprocess
import sys
import time

import yaml

from tests.helpers import ROOT, cli, recipe_text


def meshbake(*args, cwd=ROOT):
    """A real process (the smoke tests only)."""
    return subprocess.run([sys.executable, "-m", "meshbake.compiler", *args], capture_output=True, text=True, cwd=cwd)


def test_check_reports_three_schema_mistakes_and_exits_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(recipe_text().replace("seq_len: 4096", "seq_len: 4096\n  sequence_len: 4096")
                 + "checkpoint:\n  keep: -1\ndata:\n  source: parquet\n")
    r = meshbake("check", str(p))          # smoke test: a real process
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    for path in ("train.sequence_len", "checkpoint.keep", "data.source"):
        assert f"{path}:" in r.stderr, r.stderr
    assert "did you mean" in r.stderr


def test_check_reports_three_mesh_mistakes_and_exits_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(recipe_text(mesh={"dp_shard": 2, "tp": 8}, cluster={"nodes": 2, "gpus_per_node": 8},
                             tp={"sequence_parallel": True}, train={"seq_len": 4100, "global_batch_size": 3}))
    r = cli("check", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for path in ("train.seq_len", "train.global_batch_size"):
        assert f"{path}:" in r.stderr, r.stderr


def test_typo_and_mesh_mistakes_reported_in_one_run(tmp_path):
    """An unknown key does not hide the mesh errors behind it: all stages report at once."""
    p = tmp_path / "bad.yaml"
    p.write_text(recipe_text(mesh={"tp": 16}, cluster={"nodes": 2, "gpus_per_node": 8},
                             tp={"sequence_parallel": True},
                             train={"seq_len": 4100, "sequence_len": 4096, "global_batch_size": 8}))
    r = cli("check", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for path in ("train.sequence_len", "mesh.tp", "train.seq_len"):
        assert f"  {path}:" in r.stderr, r.stderr


def test_check_ok_by_name():
    r = cli("check", "70b_hsdp_tp")
    assert r.returncode == 0, r.stderr
    assert "70b_hsdp_tp" in r.stdout


def test_plan_json_and_set_override():
    r = cli("plan", "8b_tp", "--json", "--set", "mesh.tp=4", "--set", "mesh.dp_shard=2")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["mesh"]["tp"] == 4 and plan["mesh"]["dp_shard"] == 2 and plan["mesh"]["world"] == 8
    assert plan["train"]["grad_accum"] == 16 // 2


def test_bundle_writes_out_dir(tmp_path):
    t = time.perf_counter()
    r = meshbake("bundle", "70b_hsdp_tp", "-o", str(tmp_path / "out"))     # smoke test: a cold process
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "job.sbatch").is_file() and (tmp_path / "out" / "PLAN.md").is_file()
    print(f"cold bundle of 70b_hsdp_tp: {elapsed:.2f} s")


def test_unknown_recipe_name_is_a_clean_error():
    r = cli("check", "70b_hsdp")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "70b_hsdp_tp" in r.stderr        # did-you-mean


def test_unreadable_inputs_are_clean_errors(tmp_path):
    """Bytes that are not UTF-8, a directory, an unparsable --set, a file as -o: each an error
    with its path and exit 2, never a traceback."""
    (tmp_path / "bin.yaml").write_bytes(b"name: x\n\xff\xfe\x00")
    (tmp_path / "afile").write_text("x")
    cases = [(("check", str(tmp_path / "bin.yaml")), "$: ", "not UTF-8"),
             (("check", str(tmp_path)), "$: ", "a directory"),
             (("check", "tiny_cpu", "--set", "mesh.tp=[1"), "--set: ", "not YAML"),
             (("bundle", "tiny_cpu", "-o", str(tmp_path / "afile")), "-o: ", "not a directory"),
             (("bundle", "tiny_cpu", "-o", str(tmp_path)), "-o: ", "did not write")]
    for args, path, words in cases:
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert f"  {path}" in r.stderr and words in r.stderr, (args, r.stderr)
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "bin.yaml").is_file()


def test_export_of_a_non_run_dir_says_so(tmp_path):
    r = cli("export", str(tmp_path), "-o", str(tmp_path / "hf"))
    # exit 3 like every other export refusal (the user's path), one line: path, problem, fix
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path}: is not a run dir (no plan.json); give the directory" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists()


def test_suggest_process_without_the_collector_gives_the_in_process_answer(tmp_path):
    """A compile-only command's own process runs without the cyclic garbage collector and freezes
    it before exit (compiler/cli.py _without_collector); main(argv), as the tests and any
    longer-lived caller use it, leaves the collector as it found it. Both give the same ranking
    (the JSON but its timing)."""
    import gc

    from tests.helpers import tiny_recipe

    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe("sg", 4)))
    proc = meshbake("suggest", str(p), "--json")                     # smoke test: a real process
    assert proc.returncode == 0, proc.stderr
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    r = cli("suggest", str(p), "--json")
    assert r.returncode == 0, r.stderr
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    a, b = json.loads(proc.stdout), json.loads(r.stdout)
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["ranked"], (len(a["ranked"]), len(b["ranked"]))
