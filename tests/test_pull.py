"""`meshbake pull` and the offline run after it (issue 22, items 3 and 4), against tests/hubserver.py:
a local HTTP server under the Hub's URL layout that the real huggingface_hub downloads from
(HF_ENDPOINT), never a mocked huggingface_hub. HF_ENDPOINT is read when huggingface_hub is
imported, so every command that talks to the server runs as a subprocess; the offline steps
after the pull run in this process (cli())."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, cli, launch_env, tiny_recipe
from tests.hubserver import HubServer, Repo

TINY = "meshbake-test/tiny-pull"
GATED = "meshbake-test/gated"
BIG = "data/test-00000-of-00001.jsonl"
ALPACA = ROOT / "tests/fixtures/hub/datasets--tatsu-lab--alpaca/data/train-00000-of-00001.jsonl"


def tiny_config(**over) -> dict:
    """tiny-llama narrowed (hidden 32, tied): its bf16 weights are 280 KB, the 4096-id chat tokenizer fits."""
    cfg = json.loads((ROOT / "compiler/catalog/tiny-llama.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64, tie_word_embeddings=True, **over)
    return cfg


def save_weights(cfg: dict, folder: Path, dtype=None) -> Path:
    """save_pretrained of the real HF class (safetensors), as a user's checkpoint is written."""
    import torch
    from meshbake.runtime.parallel import hf_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(hf_config(cfg))
    (m.to(dtype) if dtype else m).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict:
    import torch

    w = save_weights(tiny_config(), tmp_path_factory.mktemp("w"), torch.bfloat16)
    model = {"config.json": json.dumps(tiny_config()).encode(),
             "model.safetensors": (w / "model.safetensors").read_bytes(),
             **{p.name: p.read_bytes() for p in sorted((ROOT / "data/chat_tokenizer").iterdir())},
             "pytorch_model.bin": b"not fetched: pull asks for safetensors only"}
    # a 24 MB test split (prepare reads train only): huggingface_hub writes a download in 10 MiB
    # chunks (constants.DOWNLOAD_CHUNK_SIZE) and resumes from the last whole chunk, so the resume
    # is shown on a file over 10 MiB, not on the 280 KB weights
    big = b"".join(b'{"instruction": "resume %08d", "output": "ok"}\n' % i for i in range(480_000))
    data = {".gitattributes": b"*.jsonl filter=lfs diff=lfs merge=lfs -text\n",
            "data/train-00000-of-00001.jsonl": ALPACA.read_bytes(), BIG: big}
    return {("model", TINY): Repo(model), ("dataset", "tatsu-lab/alpaca"): Repo(data),
            ("model", GATED): Repo(dict(model))}


def recipe(model: str = TINY) -> dict:
    d = tiny_recipe("pull", 1, train={"steps": 2, "seq_len": 256, "micro_batch_size": 1, "global_batch_size": 1},
                    model=model, data={"format": "alpaca", "path": "tatsu-lab/alpaca", "tokenizer": model})
    d["model"]["weights"] = model
    return d


def online_env(home: Path, url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "MESHBAKE")) and k != "TRANSFORMERS_OFFLINE"}
    return {**env, "HF_ENDPOINT": url, "HF_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def meshbake(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshbake.compiler", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.dist
def test_pull_resumes_then_runs_offline_and_preflight_names_a_lost_blob(repos, tmp_path, monkeypatch, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe()))
    home = tmp_path / "hf"
    size = len(repos[("dataset", "tatsu-lab/alpaca")].files[BIG])
    with HubServer(repos) as hub:
        hub.truncate_once.add(BIG)               # the connection drops half-way through the big file
        ran = meshbake(online_env(home, hub.url), "pull", str(r), "--set", "train.steps=2", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
        gets = hub.sent(BIG)
    sha = repos[("model", TINY)].sha
    lines = ran.stdout.splitlines()
    assert any(f"{TINY}@{sha[:12]}  model.safetensors  " in x and x.endswith("downloaded") for x in lines), ran.stdout
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "data/train-00000-of-00001.jsonl"):
        assert any(f"  {f}  " in x for x in lines), (f, ran.stdout)
    assert "pytorch_model.bin" not in ran.stdout
    assert lines[-1].startswith("8 files, ") and "downloaded now" in lines[-1], lines[-1]
    # resumed, not restarted: the second request asks for the rest with Range, and fetches less than the file
    assert [g.range is None for g in gets] == [True, False], gets
    chunk = 10 * 1024 * 1024                 # the bytes of the cut response that reached the file
    assert gets[0].sent == size // 2 and gets[1].range == f"bytes={chunk}-", gets
    assert gets[1].sent == size - chunk < size
    print(f"\nresume: {size:,} B file, first response cut at {gets[0].sent:,} B, re-fetched {gets[1].sent:,} B")

    # the server is gone: everything from the cache, HF_HUB_OFFLINE=1 (in this process from here:
    # nothing below talks to a Hub)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    again = cli("pull", str(r), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.splitlines()[-1].startswith("8 files, ") \
        and "(0 B downloaded now)" in again.stdout, again.stdout + again.stderr
    chk = cli("check", str(r), cwd=tmp_path)
    assert chk.returncode == 0, chk.stderr
    out = chk.stdout.strip().splitlines()
    assert out[-2].startswith("weights: verified: 20 parameters") and "BF16; loaded as float32" in out[-2], out
    assert out[-1].startswith("runnable"), out
    assert cli("prepare", str(r), "--quiet", cwd=tmp_path).returncode == 0
    b = cli("bundle", str(r), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    launch = (tmp_path / "out/launch.sh").read_text()
    assert 'export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"' in launch
    assert launch.index("HF_HUB_OFFLINE") < launch.index("runtime.preflight")
    # launch.sh itself sets HF_HUB_OFFLINE: the job's environment does not
    p = subprocess.run(["bash", str(tmp_path / "out/launch.sh")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=launch_env(tmp_path / "run", HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9"))
    assert p.returncode == 0, p.stderr[-4000:]
    steps = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == [1, 2], steps

    # a blob removed from the shared cache: preflight stops before torchrun, one line
    blob = (home / "hub" / f"models--{TINY.replace('/', '--')}" / "snapshots" / sha / "model.safetensors").resolve()
    blob.unlink()
    from meshbake.runtime import preflight

    capsys.readouterr()
    rc = preflight.main([str(tmp_path / "out/plan.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"meshbake: model.weights: {TINY}@{sha}: model.safetensors (its blob is gone from the "
                             "cache) is not in the Hugging Face cache"), err
    assert f"run `meshbake pull {tmp_path / 'out'}/recipe.yaml` where the Hub is reachable" in err[0], err
    p = subprocess.run(["bash", str(tmp_path / "out/launch.sh")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=launch_env(tmp_path / "run2", HF_HOME=str(home)))
    assert p.returncode == 2 and "torchrun" not in p.stderr.lower() and "model.safetensors" in p.stderr, p.stderr


def test_pull_refusals_are_one_line(repos, tmp_path):
    """A gated repo: 'set HF_TOKEN', the token never echoed; the Hub unreachable: one line; the
    headers of a repo whose weights are not cached are read remotely (HTTP range reads) by check."""
    token = "hf_meshbakeWrongTokenDoNotPrint42"
    with HubServer(repos, token="hf_the_right_one") as hub:
        hub.gated.add(GATED)
        r = tmp_path / "g.yaml"
        r.write_text(yaml.safe_dump(recipe(GATED)))
        ran = meshbake(online_env(tmp_path / "hf", hub.url, HF_TOKEN=token), "pull", str(r), cwd=tmp_path)
        assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
        assert "model.config: meshbake-test/gated is gated" in ran.stderr and "set HF_TOKEN" in ran.stderr
        assert token not in ran.stdout + ran.stderr
        assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and token.encode() in p.read_bytes()]

        ok = tmp_path / "ok.yaml"
        ok.write_text(yaml.safe_dump(recipe()))
        chk = meshbake(online_env(tmp_path / "hf2", hub.url), "check", str(ok), cwd=tmp_path)
        assert chk.returncode == 0, chk.stderr
        assert "weights: verified: 20 parameters" in chk.stdout and "(Hub metadata)" in chk.stdout, chk.stdout
        gets = hub.sent("model.safetensors")
        size = len(repos[("model", TINY)].files["model.safetensors"])
        # huggingface_hub's first range read is bytes 0-100000 (the header of a real shard fits it; the
        # rest of the file, GBs there, is never asked for); here the whole header is in those bytes
        assert gets and all(g.range for g in gets) and sum(g.sent for g in gets) == 100_001 < size, gets
        assert not list((tmp_path / "hf2").rglob("*.safetensors"))        # headers read, nothing downloaded
        print(f"\nremote header check: {sum(g.sent for g in gets):,} B of a {size:,} B file read")
    ran = meshbake(online_env(tmp_path / "hf3", hub.url), "pull", str(ok), cwd=tmp_path)   # server stopped
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert ran.stderr.startswith("meshbake: 1 problem") or "the Hub is not reachable" in ran.stderr, ran.stderr
