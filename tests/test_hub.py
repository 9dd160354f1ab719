"""Hugging Face Hub ids in a recipe (issue 22): model.config, model.weights, data.tokenizer and
data sources name `org/name[@rev]`; resolved through huggingface_hub itself (never mocked) from an
offline cache built here from tests/fixtures/hub (SOURCES.md), HF_HUB_OFFLINE=1; pinned to the
commit sha in plan.json, PLAN.md and recipe.yaml; the runtime reads that revision."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, cli, launch_env, tiny_recipe

FIX = Path(__file__).parent / "fixtures" / "hub"
TINY = "meshbake-test/tiny-llama-chat"


def _repo(cache: Path, folder: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """One repo in huggingface_hub's cache layout; its commit: sha1 over (path, sha256) pairs."""
    sha = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items()))
                       .encode()).hexdigest()
    root = cache / folder
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(sha)
    return sha


def _files(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            out[rel.removesuffix(".xz")] = lzma.decompress(p.read_bytes()) if p.suffix == ".xz" else p.read_bytes()
    return out


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    qwen = _files(FIX / "models--Qwen--Qwen3-8B")
    shas = {"qwen": _repo(cache, "models--Qwen--Qwen3-8B", qwen)}
    old = json.loads(qwen["config.json"])
    old["max_position_embeddings"] = 32768          # an older commit, tagged v0-test
    shas["qwen_old"] = _repo(cache, "models--Qwen--Qwen3-8B", {**qwen, "config.json": json.dumps(old).encode()},
                             refs=("v0-test",))
    shas["alpaca"] = _repo(cache, "datasets--tatsu-lab--alpaca", _files(FIX / "datasets--tatsu-lab--alpaca"))
    tiny = {"config.json": (ROOT / "compiler/catalog/tiny-llama.json").read_bytes(),
            **{p.name: p.read_bytes() for p in sorted((ROOT / "data/chat_tokenizer").iterdir())}}
    shas["tiny"] = _repo(cache, "models--meshbake-test--tiny-llama-chat", tiny)
    shas["nochat"] = _repo(cache, "models--meshbake-test--tiny-nochat",
                           {"config.json": tiny["config.json"], "tokenizer.json": tiny["tokenizer.json"]})
    return {"cache": cache, **shas}


@pytest.fixture
def hub(hub_cache, monkeypatch) -> dict:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    return hub_cache


def qwen_recipe(**over) -> dict:
    """Qwen3-8B LoRA on Alpaca, everything by Hub id (as an Axolotl config names them)."""
    d = yaml.safe_load((ROOT / "recipes/8b_tp.yaml").read_text())
    d["name"] = "qwen_hub"
    d["model"] = {"config": "Qwen/Qwen3-8B", "weights": "Qwen/Qwen3-8B", "dtype": "bfloat16"}
    d["data"] = {"format": "alpaca", "path": "tatsu-lab/alpaca", "tokenizer": "Qwen/Qwen3-8B"}
    d["lora"] = {"rank": 16, "alpha": 32}
    d.update(over)
    return d


def compile_dict(d: dict):
    from meshbake.compiler.pipeline import compile_recipe

    return compile_recipe(yaml.safe_dump(d, sort_keys=False), source="<test>")


def ok(d: dict):
    b = compile_dict(d)
    assert hasattr(b, "files"), b
    return b


def test_qwen3_resolves_to_its_real_config_and_tokenizer(hub):
    b = ok(qwen_recipe())
    plan = json.loads(b.files["plan.json"])
    real = json.loads((FIX / "models--Qwen--Qwen3-8B/config.json").read_text())
    assert plan["model"]["architecture"] == "Qwen3ForCausalLM"
    for k in ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings", "rope_theta"):
        assert plan["model"]["config"][k] == real[k], k
    # the tokenizer (151,669 ids) was read: against a smaller model it is an error
    bad = compile_dict(qwen_recipe(model={"config": "tiny-llama", "weights": "random"}))
    assert any(e.path == "data.tokenizer" and "vocab_size is 4096" in e.message for e in bad.errors), bad


def test_catalog_is_not_a_gate(hub):
    """The Hub id of a model the catalog also has uses the cached real config.json."""
    b = ok(qwen_recipe(model={"config": "Qwen/Qwen3-8B@v0-test", "weights": "Qwen/Qwen3-8B@v0-test"}))
    plan = json.loads(b.files["plan.json"])
    assert plan["model"]["config"]["max_position_embeddings"] == 32768       # no catalog file says this
    assert plan["model"]["hub"] == {"repo": "Qwen/Qwen3-8B", "sha": hub["qwen_old"]}


def test_every_hub_reference_pinned_in_plan_planmd_and_recipe(hub):
    b = ok(qwen_recipe())
    plan = json.loads(b.files["plan.json"])
    sha, data_sha = hub["qwen"], hub["alpaca"]
    assert plan["model"]["hub"] == {"repo": "Qwen/Qwen3-8B", "sha": sha}
    assert plan["model"]["source"] == plan["model"]["weights"] == f"Qwen/Qwen3-8B@{sha}"
    assert plan["data"]["tokenizer"] == f"Qwen/Qwen3-8B@{sha}"
    assert plan["data"]["sources"][0]["path"] == f"tatsu-lab/alpaca@{data_sha}"
    md = b.files["PLAN.md"].decode()
    assert f"`Qwen/Qwen3-8B` @ {sha[:12]}" in md
    rec = yaml.safe_load(b.files["recipe.yaml"])
    assert rec["model"]["config"] == rec["model"]["weights"] == rec["data"]["tokenizer"] == f"Qwen/Qwen3-8B@{sha}"
    assert rec["data"]["sources"][0]["path"] == f"tatsu-lab/alpaca@{data_sha}"
    assert str(hub["cache"]) not in "".join(v.decode(errors="replace") for v in b.files.values())


def test_two_compiles_identical_and_the_bundle_recompiles_to_itself(hub, tmp_path):
    first, second = ok(qwen_recipe()).files, ok(qwen_recipe()).files
    assert first == second
    from meshbake.compiler.pipeline import compile_recipe

    again = compile_recipe(first["recipe.yaml"].decode(), source="recipe.yaml")
    assert again.files == first                     # a month later, the same bundle


def test_revision_honoured(hub):
    for rev in ("v0-test", hub["qwen_old"]):
        plan = json.loads(ok(qwen_recipe(model={"config": f"Qwen/Qwen3-8B@{rev}", "weights": "random"},
                                         lora={"rank": 0})).files["plan.json"])
        assert plan["model"]["hub"]["sha"] == hub["qwen_old"]
        assert plan["model"]["config"]["max_position_embeddings"] == 32768
    main = json.loads(ok(qwen_recipe()).files["plan.json"])
    assert main["model"]["config"]["max_position_embeddings"] == 40960


def test_not_cached_is_one_line_at_the_recipe_path(hub, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(qwen_recipe(model={"config": "Qwen/Qwen3-0.6B", "weights": "Qwen/Qwen3-0.6B"})))
    err = compile_dict(yaml.safe_load(r.read_text()))
    assert len(err.errors) == 1, err                  # not model.weights (the same repo) a second time
    line = str(err.errors[0])
    assert "\n" not in line and line.startswith("model.config: Qwen/Qwen3-0.6B is not in the Hugging Face cache "
                                                f"(HF_HUB_CACHE={hub['cache']}) and HF_HUB_OFFLINE is set; run "
                                                "`hf download Qwen/Qwen3-0.6B config.json tokenizer.json"), line
    ran = cli("check", str(r))
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "  model.config: Qwen/Qwen3-0.6B is not in the Hugging Face cache" in ran.stderr, ran.stderr
    # an @revision the cache does not have is an error where it is written, too
    r.write_text(yaml.safe_dump(qwen_recipe(data={"format": "alpaca", "path": "tatsu-lab/alpaca@v9",
                                                  "tokenizer": "Qwen/Qwen3-8B"})))
    ran = cli("check", str(r))
    assert ran.returncode == 2 and "data.sources[0].path: tatsu-lab/alpaca@v9 (a dataset) is not in the" \
        in ran.stderr, ran.stderr


def test_a_local_path_wins_over_a_hub_id(hub, tmp_path):
    folder = tmp_path / "Qwen" / "Qwen3-8B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((ROOT / "compiler/catalog/tiny-llama.json").read_text())
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(tiny_recipe("local", 1, model="Qwen/Qwen3-8B")))
    ran = cli("plan", str(r), "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    plan = json.loads(ran.stdout)
    assert plan["model"]["config"]["hidden_size"] == 64 and "hub" not in plan["model"]


def test_no_token_in_bundle_plan_or_output(hub, tmp_path, monkeypatch):
    token = "hf_meshbakeTestTokenDoNotLeak123"
    monkeypatch.setenv("HF_TOKEN", token)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(qwen_recipe()))
    ran = cli("bundle", str(r), "-o", str(tmp_path / "out"))
    assert ran.returncode == 0, ran.stderr
    assert token not in ran.stdout + ran.stderr
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), p


def test_random_weights_rule(hub):
    lora_chat = qwen_recipe(model={"config": "Qwen/Qwen3-8B"})
    err = compile_dict(lora_chat)
    assert [e.path for e in err.errors] == ["model.weights"], err
    assert "random weights" in err.errors[0].message and "model.weights: random" in err.errors[0].hint
    ok(qwen_recipe(model={"config": "Qwen/Qwen3-8B", "weights": "random"}))
    # fine-tuning data without LoRA is the same mistake; pretraining text from scratch is not
    err = compile_dict(qwen_recipe(model={"config": "Qwen/Qwen3-8B"}, lora={"rank": 0}))
    assert [e.path for e in err.errors] == ["model.weights"], err
    ok(qwen_recipe(model={"config": "Qwen/Qwen3-8B"}, lora={"rank": 0},
                   data={"format": "text", "path": "tatsu-lab/alpaca", "tokenizer": "Qwen/Qwen3-8B",
                         "fields": {"text": "output"}}))   # alpaca records have no text field (compiler/columns.py)
    # synthetic smoke recipes (no data, no tokenizer) stay valid with LoRA on random init
    ok(tiny_recipe("smoke", 1, lora={"rank": 4, "alpha": 8}))
    plan = json.loads(ok(qwen_recipe(model={"config": "Qwen/Qwen3-8B", "weights": "random"})).files["plan.json"])
    assert plan["model"]["weights"] is None


def test_chat_template_required_for_chat_data(hub):
    d = tiny_recipe("nochat", 1, model="meshbake-test/tiny-nochat",
                    data={"format": "chat", "path": "chats.jsonl", "tokenizer": "meshbake-test/tiny-nochat"})
    d["model"]["weights"] = "random"
    err = compile_dict(d)
    assert any(e.path == "data.tokenizer" and "chat template" in e.message for e in err.errors), err
    d["data"]["tokenizer"] = TINY
    ok(d)


def test_check_ends_with_runnable_or_what_is_missing(hub, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(qwen_recipe(model={"config": "Qwen/Qwen3-8B", "weights": "random"})))
    ran = cli("check", str(r))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1].startswith("runnable"), ran.stdout
    r.write_text(yaml.safe_dump(qwen_recipe(data={"format": "alpaca", "path": "someone/not-cached",
                                                  "tokenizer": "Qwen/Qwen3-8B"})))
    ran = cli("check", str(r))
    last = ran.stdout.strip().splitlines()[-1]
    assert ran.returncode == 0 and last.startswith("not runnable from here yet"), ran.stdout
    assert "data.sources[0].path: 'someone/not-cached'" in last and "model.weights" in last   # no *.safetensors


@pytest.mark.dist
def test_tiny_run_from_hub_ids_offline(hub, tmp_path):
    """meshbake prepare + a 2-step world-1 run with config, tokenizer and data by Hub id."""
    d = tiny_recipe("hubrun", 1, train={"steps": 2, "seq_len": 256, "micro_batch_size": 1, "global_batch_size": 1},
                    model=TINY, data={"format": "alpaca", "path": "tatsu-lab/alpaca", "tokenizer": TINY})
    d["model"]["weights"] = "random"
    r = tmp_path / "hubrun.yaml"
    r.write_text(yaml.safe_dump(d))
    ran = cli("prepare", str(r), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    ran = cli("bundle", str(r), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    plan = json.loads((tmp_path / "out/plan.json").read_text())
    assert plan["data"]["tokenizer"] == f"{TINY}@{hub['tiny']}"
    env = launch_env(tmp_path / "run", HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1")
    p = subprocess.run(["bash", str(tmp_path / "out/launch.sh")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-5000:]
    steps = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert [s["step"] for s in steps][-1] == 2


def test_preflight_looks_pinned_ids_up_in_the_cache_when_offline(hub, tmp_path, monkeypatch):
    from meshbake.runtime import plan as P
    from meshbake.runtime.preflight import problems

    plan = P.loads(ok(qwen_recipe()).files["plan.json"].decode())
    # config, tokenizer and data are cached; the weights are not (the fixture has no *.safetensors)
    sha = hub["qwen"]
    assert [p for p in problems(plan, "out/recipe.yaml") if "Qwen" in p or "alpaca" in p] == [
        f"model.weights: Qwen/Qwen3-8B@{sha}: *.safetensors (no weights file) is not in the Hugging Face cache "
        f"(HF_HUB_CACHE={hub['cache']}) and HF_HUB_OFFLINE is set; run `meshbake pull out/recipe.yaml` where the Hub "
        "is reachable, with the same HF_HUB_CACHE"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    found = [p for p in problems(plan) if "HF_HUB_OFFLINE" in p]
    assert [p.split(":")[0] for p in found] == ["data.path", "data.tokenizer", "model.weights"], found
    assert f"hf download Qwen/Qwen3-8B --revision {hub['qwen']}" in found[1]
