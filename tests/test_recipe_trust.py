"""Issue 21, "trust nothing you did not write": what a recipe, a cluster profile, an Axolotl file
or a config.json may make the job do. cluster.env is an allow-list of tuning variables; a
secret is refused wherever it is written; the folders the runtime deletes in stay inside their
parent; an imported key cannot start a line of the recipe; an attention-kernel key of a
config.json never reaches transformers' Hub kernel loader."""
from __future__ import annotations

import json

import pytest
from meshbake.compiler.errors import Err
from meshbake.compiler.validate import validate_fields

from tests.helpers import compiled, tiny_recipe

HEX40 = "0e9e39f249a16976918f6564b8830bc894c89659"
HF = "hf_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3x"      # the shape of a Hugging Face token, not one


def _errors(**sections) -> list:
    d = {"name": "t", "model": {"config": "llama-3.1-8b"}, "mesh": {"tp": 8},
         "cluster": {"nodes": 1, "gpus_per_node": 8}, "train": {"seq_len": 4096, "global_batch_size": 8}}
    for k, v in sections.items():
        d[k] = {**d[k], **v} if isinstance(d.get(k), dict) else v
    return list(validate_fields(d).errors)


def _at(errs, path: str) -> list:
    return [e for e in errs if e.path == path]


# ---- cluster.env: an allow-list ---------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("PYTHONUSERBASE", "python"), ("LD_LIBRARY_PATH", "load code"), ("GCONV_PATH", "load code"),
    ("NCCL_NET_PLUGIN", "load code"), ("NCCL_TUNER_PLUGIN", "load code"), ("NCCL_PROFILER_PLUGIN", "load code"),
    ("FI_PROVIDER_PATH", "load code"), ("UCX_MODULE_DIR", "load code"), ("TRITON_LIBCUDA_PATH", "load code"),
    ("TORCH_EXTENSIONS_DIR", "load code"), ("TRITON_CACHE_DIR", "load code"), ("TRITON_CACHE_MANAGER", "load code"),
    ("NCCL_CONF_FILE", "load code"), ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "load code"),
    ("WANDB_BASE_URL", "credentials"), ("HF_ENDPOINT", "credentials"), ("HTTPS_PROXY", "credentials"),
    ("SITE_SETTING", "not a tuning variable"), ("MASTER_PORT", "launcher")])
def test_env_outside_the_allow_list_is_refused_with_its_reason(name, why):
    errs = _at(_errors(cluster={"env": {name: "x", "NCCL_DEBUG": "WARN"}}), f"cluster.env.{name}")
    assert len(errs) == 1 and why in errs[0].message, errs
    assert errs[0].hint


def test_tuning_variables_real_clusters_set_pass():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN", "NCCL_TOPO_FILE": "/opt/topo.xml",
           "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": 1, "UCX_TLS": "rc", "GLOO_SOCKET_IFNAME": "eth0",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": 1, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "TORCHINDUCTOR_COMPILE_THREADS": 1, "TRITON_PRINT_AUTOTUNING": 1, "CUDA_DEVICE_MAX_CONNECTIONS": 1,
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "CUDNN_LOGERR_DBG": 1, "NVTE_FUSED_ATTN": 1, "OMP_NUM_THREADS": 4,
           "MKL_NUM_THREADS": 4, "HF_HUB_OFFLINE": 1, "HF_DATASETS_OFFLINE": 1, "TRANSFORMERS_OFFLINE": 1,
           "TOKENIZERS_PARALLELISM": "false"}
    assert _errors(cluster={"env": env}) == []


def test_secret_in_env_setup_is_refused_a_reference_is_not():
    line = "source /opt/venv/bin/activate && export HF_TOKEN=abc123 && WANDB_API_KEY='k' true"
    errs = _at(_errors(cluster={"env_setup": line}), "cluster.env_setup")
    assert {e.message.split()[1] for e in errs} == {"HF_TOKEN", "WANDB_API_KEY"}, errs
    assert all("cluster.env_pass" in e.hint for e in errs)
    ok = "export HF_TOKEN=$(cat ~/.hf_token) && export WANDB_API_KEY=\"${SITE_KEY}\" && export TOKENIZERS_PARALLELISM=1"
    assert _errors(cluster={"env_setup": ok}) == []


@pytest.mark.parametrize("sections, path", [
    ({"cluster": {"env": {"NCCL_DEBUG": HF}}}, "cluster.env.NCCL_DEBUG"),
    ({"cluster": {"env_setup": f"huggingface-cli login --token {HF}"}}, "cluster.env_setup"),
    ({"run_dir": "runs/ghp_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"}, "run_dir"),
    ({"cluster": {"account": "AKIAABCDEFGHIJKLMNOP"}}, "cluster.account"),
    ({"cluster": {"env_setup": f"wandb login --relogin {HEX40}"}}, "cluster.env_setup"),
    ({"tracking": {"wandb": {"project": "p", "api_key": HEX40}}}, "tracking.wandb.api_key"),
    ({"cluster": {"qos": "-----BEGIN OPENSSH PRIVATE KEY-----"}}, "cluster.qos"),
])
def test_token_shaped_values_are_refused_at_their_path(sections, path):
    errs = [e for e in _at(_errors(**sections), path) if "looks like" in e.message]
    assert errs, _errors(**sections)
    assert "cluster.env_pass" in errs[0].hint and HF not in errs[0].message


def test_hex_and_paths_that_are_no_secret_pass():
    snap = f"/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/{HEX40}"
    errs = _errors(data={"format": "text", "path": f"data/{HEX40}.jsonl", "tokenizer": snap},
                   run_dir=f"runs/{HEX40}", cluster={"env_setup": f"cd /src && git checkout {HEX40}"},
                   name="sk-learn-baseline-experiments-long")
    assert [e for e in errs if "looks like" in e.message] == []


# ---- checkpoint.dir and data.prepared_dir stay inside their parent -------------------------------
@pytest.mark.parametrize("sections, path", [
    ({"checkpoint": {"dir": "/shared/runs/other/checkpoints"}}, "checkpoint.dir"),
    ({"checkpoint": {"dir": "../../other/checkpoints"}}, "checkpoint.dir"),
    ({"checkpoint": {"dir": "a/../../b"}}, "checkpoint.dir"),
    ({"data": {"prepared_dir": "/lustre/prepared"}}, "data.prepared_dir"),
    ({"data": {"prepared_dir": ".."}}, "data.prepared_dir")])
def test_deleting_folders_outside_their_parent_are_refused(sections, path):
    errs = _at(_errors(**sections), path)
    assert len(errs) == 1 and "outside" in errs[0].message and "no leading / and no .." in errs[0].hint, errs


def test_folders_inside_their_parent_and_an_absolute_run_dir_pass():
    assert _errors(checkpoint={"dir": "ckpt/a/../b"}, data={"prepared_dir": "cache/prepared"},
                   run_dir="/shared/runs/mine") == []


# ---- the Axolotl importer: no line of the recipe from a key or a value -----------------------------
EVIL = "\nrun_dir: /tmp/evil\ncheckpoint:\n  keep: 1"


def test_imported_key_with_newlines_is_listed_escaped_not_live():
    from meshbake.compiler import load
    from meshbake.compiler.importers.axolotl import import_axolotl

    cfg = {"base_model": "NousResearch/Meta-Llama-3.1-8B" + EVIL, "sequence_len": 2048, "micro_batch_size": 1,
           "gradient_accumulation_steps": 1, "learning_rate": 2e-5, "max_steps": 10, EVIL: True, "x" + EVIL: 1,
           "datasets": [{"path": "data/a.jsonl" + EVIL, "type": "completion"}],
           "dataset_prepared_path": "/abs/prepared"}
    imp = import_axolotl(cfg, "t", source="cfg.yml" + EVIL, model_ref="llama-3.1-8b")
    d = load.parse_yaml(imp.text, "<imported>")          # meshbake's strict loader reads it
    assert not isinstance(d, Err), d
    assert "run_dir" not in d and "keep" not in d.get("checkpoint", {}), d
    assert "prepared_dir" not in d["data"]                 # absolute: not mapped, the reason listed
    assert d["data"]["sources"] == [{"path": "data/a.jsonl" + EVIL}]     # a value stays one value
    assert not any(line.startswith(("run_dir", "checkpoint", "  keep")) for line in imp.text.splitlines())
    assert f"# not mapped   {EVIL!r}: " in imp.text and f"# not mapped   {'x' + EVIL!r}: " in imp.text


# ---- config.json attention-kernel keys ---------------------------------------------------------------
KERNELS = {"attn_implementation": "org/repo", "_attn_implementation": "org/repo:kernel",
           "experts_implementation": "org/experts"}


def test_kernel_keys_are_dropped_at_compile_time_and_not_recorded(tmp_path):
    from meshbake.compiler.model import CATALOG_DIR

    cfg = {**json.loads((CATALOG_DIR / "tiny-llama.json").read_text()), **KERNELS}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = json.loads(compiled(tiny_recipe("k", 2, model=str(tmp_path / "config.json"))).files["plan.json"])
    assert not set(KERNELS) & set(plan["model"]["config"]), plan["model"]["config"]
    assert plan["model"]["attn_implementation"] == "sdpa"


def test_runtime_hf_config_never_sees_kernel_keys():
    """A plan.json carrying the keys (by hand, or from an older compiler): the config transformers
    builds from holds none of them, and meta_model sets the plan's attention."""
    from meshbake.compiler import model as compiler_model
    from meshbake.runtime import parallel
    from meshbake.runtime.plan import from_dict

    assert parallel.KERNEL_KEYS == compiler_model.KERNEL_KEYS
    plan = json.loads(compiled(tiny_recipe("k", 2)).files["plan.json"])
    plan["model"]["config"].update(KERNELS)
    cfg = parallel.hf_config(plan["model"]["config"])
    assert cfg._attn_implementation is None and cfg._experts_implementation is None
    assert "org/" not in json.dumps(cfg.to_dict())
    model = parallel.meta_model(from_dict(plan))        # from_config: no Hub kernel resolved
    assert model.config._attn_implementation == plan["model"]["attn_implementation"] == "sdpa"
