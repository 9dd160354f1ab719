"""The datasheet step-time model against published runs it was not fitted to (bench/published.py):
pure compiler math, no torch launch. The held-out rows of bench/published_runs.json are resolved
through the compiler's own stages and predicted at the committed constants (compiler/perf.py);
the share within +-20% of measured tokens/s per GPU must not drop below the documented figure."""
from __future__ import annotations

import json

import pytest
from meshbake.compiler import perf
from meshbake.compiler.validate import validate_all
from meshbake.runtime.sections import schema

from bench import published as B


def test_held_out_error_band_holds():
    cases = B.cases(B.held_out)
    ratios = [B.predict(c, perf.DEFAULT) / c.row["tok_s_gpu"] for c in cases]
    # the harness times what the compiler times: plan.json's tokens/s (a pp row on its stage's blocks),
    # except where a row names the published run's own attention kernel
    same = [(c.row["id"], B.predict(c, perf.DEFAULT), c.est.time.tokens_per_s_gpu) for c in cases
            if not c.row.get("attention")]
    assert any(c.row.get("pp") for c in cases) and len(same) >= len(cases) - 2
    assert all(p == pytest.approx(q, rel=1e-9) for _, p, q in same), same
    n_in, n, med = B.summary(ratios)
    # the figures PLAN.md, suggest and docs/PERFORMANCE.md state
    assert n == perf.HELD_OUT_ROWS, [c.row["id"] for c in cases]
    assert n_in / n >= perf.HELD_OUT_WITHIN - 1e-9, sorted(zip(ratios, (c.row["id"] for c in cases)))
    assert med == pytest.approx(perf.HELD_OUT_MEDIAN, abs=0.005)
    assert perf.HELD_OUT_WITHIN >= 0.8          # issue 25's goal; the docs say so if it ever is not met
    # the split is by id and never depends on the result: a third of the rows, several codebases
    rows = [r for r in B.rows() if not r["fp8"]]
    assert {r["codebase"] for r in rows if B.held_out(r)} >= {"llm-foundry", "torchtitan", "fms-fsdp (IBM)",
                                                              "NeMo AutoModel"}
    assert 0.2 < sum(map(B.held_out, rows)) / len(rows) < 0.45


KEYS = {"id", "codebase", "source", "table", "gpu", "cluster", "model", "nodes", "gpus_per_node", "mesh", "seq", "mbs",
        "gbs", "ac", "compile", "fp8", "dtype", "tok_s_gpu", "settings", "fused_kernels", "reduce_dtype", "pp", "sp",
        "lora", "attention"}


def test_runs_name_their_source_and_settings():
    for r in B.rows():
        assert r["source"].startswith("https://github.com/") and len(r["source"].split("/blob/")[1].split("/")[0]) == 40
        assert r["gpu"] in perf.GPUS and r["tok_s_gpu"] > 0 and r["settings"], r["id"]
        dr, ds, cp, tp = r["mesh"]
        assert B.world(r) == r["nodes"] * r["gpus_per_node"], r["id"]
        assert r["gbs"] % (dr * ds * r["mbs"]) == 0, r["id"]
        assert set(r) <= KEYS, (r["id"], set(r) - KEYS)      # a misspelt optional key would be ignored


def test_gpu_catalog_fills_the_cluster_facts():
    """cluster.gpu names the catalog; its facts go under the keys the recipe leaves unset."""
    enum = schema()["properties"]["cluster"]["properties"]["gpu"]["enum"]
    assert set(enum) - {None} == set(perf.GPUS)
    base = json.loads(json.dumps({"name": "x", "model": {"config": "tiny-llama"},
                                  "train": {"seq_len": 128, "micro_batch_size": 1, "global_batch_size": 8, "lr": 1e-4},
                                  "data": {"source": "synthetic"}}))
    r, errs = validate_all({**base, "cluster": {"gpu": "a100-40gb"}})
    assert not errs
    c = r.cluster
    assert (c.peak_tflops, c.hbm_gbps, c.intra_node_gbps, c.inter_node_gbps, c.nics_per_node, c.gpu_memory_gb) == \
        (312, 1555, 300, 25, 8, 40)
    r, errs = validate_all({**base, "cluster": {"gpu": "h200", "hbm_gbps": 4000}})
    assert not errs and r.cluster.hbm_gbps == 4000 and r.cluster.gpu_memory_gb == 141     # the recipe wins
    _, errs = validate_all({**base, "cluster": {"gpu": "h300"}})
    assert [e.path for e in errs] == ["cluster.gpu"]
    # without cluster.gpu the profile is found by its peak (clusters/gres-a100-modules.yaml: 312)
    assert perf.gpu_of(None, 312).family == "a100" and perf.gpu_of(None, 123).family == "generic"


def test_collective_groups_use_their_rails():
    """A flat group over whole nodes gets every NIC of them; one GPU per node gets its own rail."""
    h = perf.GPUS["h100-sxm"]
    flat = perf.group_of(128, 1, 8)                   # FSDP 128: 8 per node over 16 nodes
    rail = perf.group_of(16, 8, 8)                    # HSDP replicas 8 apart: one per node
    assert (flat.per_node, flat.nodes, rail.per_node, rail.nodes) == (8, 16, 1, 16)
    assert perf.bus_gbps(flat, h, 450, 50, 8, 8) == pytest.approx(min(450 * perf.NVLINK_EFF, 400 * perf.NET_EFF))
    assert perf.bus_gbps(rail, h, 450, 50, 8, 8) == pytest.approx(50 * perf.NET_EFF)
    assert perf.bus_gbps(perf.group_of(8, 1, 8), h, 450, 50, 8, 8) == pytest.approx(450 * perf.NVLINK_EFF)
    # all-reduce across nodes: a tree (log2 of the nodes), not a ring over all 128 ranks
    assert perf.latency_s("all_reduce", flat) < perf.latency_s("all_gather", flat)
