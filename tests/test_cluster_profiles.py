"""Cluster profiles (clusters/*.yaml): every example validates and has a golden bundle; the GPU
request spelling, --exclusive, the pyxis/enroot container and the NCCL environment render as
Slurm and bash read them; profile values can never run as shell code."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from meshbake.compiler.errors import Err
from meshbake.compiler.pipeline import compile_recipe

from tests.golden_refresh import PROFILE_GOLDENS, golden_files
from tests.helpers import ROOT

CLUSTERS = sorted(p.stem for p in (ROOT / "clusters").glob("*.yaml"))
TEMPLATE_PROFILES = {"local-cpu", "example-h100"}      # the test cluster and the fill-in template


def _sbatch(cluster: dict, **sections) -> str:
    d = {"name": "p", "model": {"config": "llama-3.1-8b"}, "mesh": {"tp": 8},
         "cluster": {"nodes": 2, "gpus_per_node": 8, **cluster}, "train": {"seq_len": 4096, "global_batch_size": 16},
         **sections}
    b = compile_recipe(yaml.safe_dump(d), source="p")
    assert not isinstance(b, Err), b
    return b.files["job.sbatch"].decode()


def test_every_example_profile_has_a_golden_bundle():
    assert set(CLUSTERS) - TEMPLATE_PROFILES == set(PROFILE_GOLDENS)
    assert len(PROFILE_GOLDENS) >= 3


@pytest.mark.parametrize("profile", CLUSTERS)
def test_every_profile_validates(profile):
    recipe, overrides = PROFILE_GOLDENS.get(profile, ("70b_lora_fsdp_tp", ()))
    if profile == "local-cpu":
        recipe = "tiny_cpu"
    b = compile_recipe((ROOT / f"recipes/{recipe}.yaml").read_text(), overrides=overrides, cluster=profile)
    assert not isinstance(b, Err), b
    assert b.resolved.recipe.cluster.profile == profile


def test_gpu_request_spellings_and_exclusive():
    s = _sbatch({})
    assert "#SBATCH --gpus-per-node=8\n" in s and "--gres" not in s and "--exclusive" not in s
    s = _sbatch({"gpu_request": "gres", "gpu_type": "a100", "exclusive": True})
    assert "#SBATCH --gres=gpu:a100:8\n" in s and "--gpus-per-node" not in s and "#SBATCH --exclusive\n" in s
    s = _sbatch({"gpu_type": "h100"})
    assert "#SBATCH --gpus-per-node=h100:8\n" in s
    s = _sbatch({"gpu_request": "none", "exclusive": True})
    assert "--gpus-per-node" not in s and "--gres" not in s


def _block(script: str, start: str, end: str) -> str:
    a = script.index(start)
    return script[a:script.index(end, a)]


def test_env_values_are_literal_under_bash(tmp_path):
    """A value full of shell syntax is exported byte for byte and runs nothing."""
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker})`touch {marker}`'; touch {marker}; echo '\\ ${{HOME}} ^lo,docker"
    s = _sbatch({"env": {"NCCL_SOCKET_IFNAME": hostile, "NCCL_IB_HCA": "mlx5", "FI_EFA_FORK_SAFE": 1}})
    exports = _block(s, "export FI_EFA_FORK_SAFE", "\n\n")
    assert exports.splitlines()[0] == "export FI_EFA_FORK_SAFE=1"            # sorted, one line each
    p = subprocess.run(["bash", "-c", exports + '\nprintf "%s|%s|%s" "$NCCL_SOCKET_IFNAME" "$NCCL_IB_HCA" '
                        '"$FI_EFA_FORK_SAFE"'], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{hostile}|mlx5|1"
    assert not marker.exists()


def test_pyxis_container_arguments(tmp_path):
    s = _sbatch({"container_image": "nvcr.io#nvidia/pytorch:25.01-py3",
                 "container_mounts": ["/lustre:/lustre:ro", "/scratch:/scratch"]})
    block = _block(s, "MESHBAKE_HEAD_NODE=", "\n\n")
    block = block.replace('"$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"', "n17")
    p = subprocess.run(["bash", "-c", 'set -u\nMESHBAKE_BUNDLE_DIR="/home/u/my run/out"\nSLURM_SUBMIT_DIR=/home/u\n'
                        + block + '\nprintf "%s\\n" "${container[@]}" "$MESHBAKE_HEAD_NODE"'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
        "--container-mounts=/home/u/my run/out:/home/u/my run/out,/home/u:/home/u,/lustre:/lustre:ro,"
        "/scratch:/scratch",
        "--container-workdir=/home/u", "n17"]
    assert re.search(r'^srun .* "\$\{container\[@\]\}" bash "\$\{MESHBAKE_BUNDLE_DIR\}/launch.sh" &$', s, re.M)
    # without an image: the plain srun line, no container arguments
    assert "container" not in _sbatch({}).split("set -euo pipefail")[1]


@pytest.mark.parametrize("env, path", [({"PATH": "/tmp"}, "cluster.env.PATH"),
                                       ({"MESHBAKE_RUN_DIR": "/x"}, "cluster.env.MESHBAKE_RUN_DIR"),
                                       ({"WANDB_API_KEY": "abc"}, "cluster.env.WANDB_API_KEY"),
                                       ({"MY_PASSWORD": "abc"}, "cluster.env.MY_PASSWORD"),
                                       ({"PYTHONUSERBASE": "/tmp/u"}, "cluster.env.PYTHONUSERBASE"),
                                       ({"WANDB_BASE_URL": "https://x"}, "cluster.env.WANDB_BASE_URL"),
                                       ({"nccl_debug": "INFO"}, "cluster.env")])
def test_env_names_refused(env, path):
    d = {"name": "p", "model": {"config": "llama-3.1-8b"}, "mesh": {"tp": 8},
         "cluster": {"nodes": 1, "gpus_per_node": 8, "env": env}, "train": {"seq_len": 4096, "global_batch_size": 8}}
    err = compile_recipe(yaml.safe_dump(d), source="p")
    assert isinstance(err, Err)
    assert any(e.path.startswith(path) for e in err.errors), err.errors


def test_profile_goldens_show_their_settings():
    pyxis = golden_files("cluster_nvidia-pyxis-h100")["job.sbatch"].decode()
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in pyxis and "#SBATCH --exclusive" in pyxis
    aws = golden_files("cluster_aws-p5-efa")["job.sbatch"].decode()
    assert "export FI_PROVIDER=efa" in aws and "export NCCL_SOCKET_IFNAME='^docker,lo,veth'" in aws
    gres = golden_files("cluster_gres-a100-modules")
    assert "#SBATCH --gres=gpu:a100:4" in gres["job.sbatch"].decode()
    assert "module load cuda/12.4" in gres["launch.sh"].decode()
    assert Path(ROOT / "tests/golden/cluster_gres-a100-modules/job.sbatch").is_file()
