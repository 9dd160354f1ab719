"""Security issue 21, "trust nothing you did not write", for the reviewer's side of a bundle:
PLAN.md shows everything the job runs besides plan.json (env_setup verbatim, the environment,
the container and its mounts, every path), invisible Unicode is shown, `meshbake verify` tells
a bundle that is exactly what its recipe compiles to from one edited by hand, recipe strings
are text (never rich markup) on the console, and a previous out/ is never written through."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from tests.helpers import ROOT, cli, compile_, recipe_text

SETUP = ("source /opt/venv/bin/activate && export MESHBAKE_RUN_DIR=/scratch/elsewhere\n"
         "echo ```` done")       # a backtick run longer than a plain ``` fence


def _plan_md(**sections) -> str:
    b = compile_(recipe_text(**sections))
    assert hasattr(b, "files"), b
    return b.files["PLAN.md"].decode()


def _section(md: str) -> str:
    return md[md.index("## What the job runs"):md.index("## Launch")]


# ------------------------------------------------------------------ PLAN.md: what the job runs
def test_plan_shows_env_setup_verbatim_in_a_fence_nothing_inside_closes():
    s = _section(_plan_md(cluster={"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80, "env_setup": SETUP}))
    fence = "`" * 5                                   # one longer than the value's ```` run
    assert f"{fence}sh\n{SETUP}\n{fence}\n" in s, s
    assert "**before** anything else" in s and "can change anything" in s
    assert "It names MESHBAKE_RUN_DIR" in s          # the override is pointed at, not only printed


def test_plan_shows_env_pairs_env_pass_container_mounts_and_every_path():
    md = _plan_md(cluster={"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80,
                           "env": {"NCCL_IB_HCA": "mlx5", "TORCH_NCCL_BLOCKING_WAIT": "1"},
                           "env_pass": ["HF_TOKEN", "WANDB_API_KEY", "MY_SECRET"],
                           "container_image": "nvcr.io#nvidia/pytorch:25.01-py3",
                           "container_mounts": ["/:/host", "/lustre:/lustre:ro"]},
                  run_dir="runs/r1", checkpoint={"dir": "ckpts"},
                  data={"format": "text", "sources": [{"path": "data/a.jsonl", "weight": 2.0}],
                        "tokenizer": "tok/dir", "prepared_dir": "prep/here"},
                  tracking={"wandb": {"project": "p1", "mode": "online"}})
    s = _section(md)
    assert "| NCCL_IB_HCA | `mlx5` |" in s
    assert "| TORCH_NCCL_BLOCKING_WAIT | `1` |" in s     # cluster.env is an allow-list: LD_LIBRARY_PATH is refused
    assert "HF_TOKEN, WANDB_API_KEY, MY_SECRET" in s
    assert "`nvcr.io#nvidia/pytorch:25.01-py3`" in s
    assert "| `/` **(the host's whole filesystem)** | `/host` | **read-write** |" in s
    assert "| `/lustre` | `/lustre` | read-only |" in s
    assert "| run directory | `runs/r1`, unless MESHBAKE_RUN_DIR is set in the job's environment or by env_setup |" in s
    assert "| checkpoints | `runs/r1/ckpts` |" in s
    assert "| prepared data | `prep/here` |" in s
    assert "| data sources | `data/a.jsonl` (weight 2.0) |" in s
    assert "| tokenizer | `tok/dir` |" in s
    assert "project `p1`" in s and "**streamed over the network** to W&B's default server" in s


def test_plan_shows_unicode_format_characters_as_escapes():
    md = _plan_md(run_dir="runs/a\u202eb\u200bc",
                  cluster={"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80, "env_setup": "echo \u2066x\u2069\ufeff",
                           "env": {"NCCL_X": "v\u202ew"}})
    for ch in ("\u202e", "\u200b", "\u2066", "\u2069", "\ufeff"):
        assert ch not in md, repr(ch)
    s = _section(md)
    assert "`runs/a\\u202eb\\u200bc`" in s
    assert "echo \\u2066x\\u2069\\ufeff" in s
    assert "`v\\u202ew`" in s


def test_md_and_md_code_escape_format_and_separator_characters():
    from meshbake.compiler.render import md, md_block, md_code

    assert md("a\u202eb\u2028c") == "a\\\\u202eb\\\\u2028c"            # markdown shows \u202e
    assert md_code("a\u200bb\u2029") == "`a\\u200bb\\u2029`"
    assert md_block("x\n\ty\u2067", "sh") == "```sh\nx\n\ty\\u2067\n```"
    assert md("tab\there") == "tab\\\\u0009here"                        # control characters as before


# ------------------------------------------------------------------ meshbake verify
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "out"
    r = cli("bundle", "tiny_cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(bundle, dst, symlinks=True)
    return dst


def test_verify_identical_bundle_exits_0(copy):
    r = cli("verify", str(copy))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout


def test_verify_one_byte_changed_in_launch_sh_exits_1_naming_it(copy):
    p = copy / "launch.sh"
    data = bytearray(p.read_bytes())
    i = data.index(b"set -euo pipefail")
    data[i + 4] = ord("+")                            # set -euo -> set +euo
    p.write_bytes(bytes(data))
    r = cli("verify", str(copy))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "launch.sh: differs" in r.stdout
    assert "'set +euo pipefail'" in r.stdout and "'set -euo pipefail'" in r.stdout   # the first differing line


def test_verify_extra_file_exits_1(copy):
    (copy / "runtime" / "__pycache__").mkdir()
    (copy / "runtime" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0code")
    (copy / "sitecustomize.py").write_text("import os\n")
    r = cli("verify", str(copy))
    assert r.returncode == 1
    assert "sitecustomize.py: only in the bundle" in r.stdout
    assert "runtime/__pycache__/train.cpython-311.pyc: only in the bundle" in r.stdout


def test_verify_symlink_planted_exits_1_even_to_identical_bytes(copy, tmp_path):
    same = tmp_path / "plan_copy.py"
    shutil.copy(copy / "runtime" / "plan.py", same)
    (copy / "runtime" / "plan.py").unlink()
    (copy / "runtime" / "plan.py").symlink_to(same)   # followed, the bytes would be identical
    r = cli("verify", str(copy))
    assert r.returncode == 1, r.stdout
    assert "runtime/plan.py: is a symbolic link" in r.stdout


def test_verify_fifo_is_a_difference_and_never_read(copy):
    os.mkfifo(copy / "PLAN.md.fifo")
    r = cli("verify", str(copy))                      # an open() of the FIFO would block here
    assert r.returncode == 1 and "PLAN.md.fifo: is a FIFO" in r.stdout


def test_verify_recipe_that_no_longer_compiles_exits_2(copy):
    p = copy / "recipe.yaml"
    d = yaml.safe_load(p.read_text())
    d["mesh"]["tp"] = 3                               # does not divide 4 heads
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    r = cli("verify", str(copy))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "recipe.yaml:" in r.stderr and "not divisible" in r.stderr


def test_verify_not_a_bundle_exits_3(tmp_path):
    (tmp_path / "x").mkdir()
    assert cli("verify", str(tmp_path / "x")).returncode == 3
    assert cli("verify", str(tmp_path / "missing")).returncode == 3


def test_verify_warns_when_the_recorded_versions_are_not_installed(copy):
    p = copy / "plan.json"
    plan = json.loads(p.read_text())
    plan["versions"]["torch"] = "0.0.1"
    p.write_text(json.dumps(plan))
    r = cli("verify", str(copy))
    assert r.returncode == 1
    assert "torch 0.0.1 (installed" in r.stderr and "plan.json: differs" in r.stdout


# ------------------------------------------------------------------ the console and out/
def test_bundle_of_a_model_folder_named_like_rich_markup_exits_0(tmp_path):
    folder = tmp_path / "ra[" / "zz]"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "compiler" / "catalog" / "tiny-llama.json", folder / "config.json")
    rec = yaml.safe_load((ROOT / "recipes" / "tiny_cpu.yaml").read_text())
    rec["model"]["config"] = "ra[/zz]"                # relative to the working directory, as bundle reads it
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    r = cli("bundle", "r.yaml", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ra[/zz]" in r.stdout                      # shown as text
    assert cli("verify", "out", cwd=tmp_path).returncode == 0


def test_bundle_never_writes_through_a_symlink_in_the_previous_out(copy, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (copy / "launch.sh").unlink()
    (copy / "launch.sh").symlink_to(victim)           # listed in MANIFEST.sha256: out/ is still a bundle
    r = cli("bundle", "tiny_cpu", "-o", str(copy))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "mine\n"
    assert not (copy / "launch.sh").is_symlink() and (copy / "launch.sh").read_bytes().startswith(b"#!")


def test_bundle_refuses_an_out_holding_a_symlinked_dir_it_did_not_write(tmp_path):
    mine = tmp_path / "project"
    (tmp_path / "data").mkdir()
    mine.mkdir()
    (mine / "data").symlink_to(tmp_path / "data")     # the user's link: once ignored, so `-o project` replaced it
    r = cli("bundle", "tiny_cpu", "-o", str(mine))
    assert r.returncode == 2 and "data" in r.stderr and "did not write" in r.stderr, r.stderr
    assert (mine / "data").is_symlink()


def test_bundle_refuses_a_previous_out_whose_manifest_is_not_a_regular_file(copy, tmp_path):
    (copy / "MANIFEST.sha256").unlink()
    os.mkfifo(copy / "MANIFEST.sha256")               # never opened for a blocking read
    (copy / "notes.txt").write_text("mine\n")
    r = cli("bundle", "tiny_cpu", "-o", str(copy))
    assert r.returncode == 2 and "did not write" in r.stderr, r.stderr
    assert (copy / "notes.txt").read_text() == "mine\n"
