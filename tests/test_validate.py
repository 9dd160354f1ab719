"""validate stage details: YAML 1.1 surprises, whole floats for integers, hints."""
from __future__ import annotations

import json

from meshbake.compiler.errors import Err

from tests.helpers import compile_, paths, recipe_text


def test_whole_floats_become_ints_in_the_plan():
    b = compile_(recipe_text(train={"seq_len": 4096, "global_batch_size": 8, "steps": 1e4}), "mesh.tp=8.0")
    plan = json.loads(b.files["plan.json"])
    assert plan["train"]["steps"] == 10000 and isinstance(plan["train"]["steps"], int)
    assert plan["mesh"]["tp"] == 8 and "--nodes=1\n" in b.files["job.sbatch"].decode()


def test_unquoted_slurm_time_is_a_string_not_base60():
    text = recipe_text().replace("gpu_memory_gb: 80", "gpu_memory_gb: 80\n  time: 24:00:00")
    assert "time: 24:00:00" in text
    b = compile_(text)
    assert "#SBATCH --time=24:00:00\n" in b.files["job.sbatch"].decode()


def test_enum_alias_hint_and_json_spelling():
    err = compile_(recipe_text(cluster={"nodes": 1, "gpus_per_node": 8, "device": "gpu"}))
    assert isinstance(err, Err) and paths(err) == ["cluster.device"]
    assert "'cuda'" in err.errors[0].hint and err.errors[0].message == '"gpu" is not allowed'


def test_type_error_says_what_to_write():
    err = compile_(recipe_text(train={"seq_len": "4k", "global_batch_size": 8}))
    e = err.errors[0]
    assert e.path == "train.seq_len" and "write an integer" in e.hint
