"""Our step-time model vs published throughput: torchtitan's Llama 3.1 H100 table and the seed
tutorial's illustrative 70B table.  python -m bench.published  -> the table in docs/PERFORMANCE.md

Each row is a recipe dict run through the compiler's own stages (estimate.step_time); the memory
budget is lifted so a plan that would not fit still gets a time, and its estimated peak is shown
beside the GPU's memory instead.
"""
from __future__ import annotations

import sys

# torchtitan docs/performance.md (pytorch/torchtitan@bf835b59, now benchmarks/llama3_h100_202412_torchtitan.md):
# Grand Teton H100 (96 GB HBM2e at 2.4 TB/s, 500 W), NVLink in a host, 400 Gb/s RDMA per GPU;
# bf16 compute, fp32 reduce, seq 8192 unless the table gives another
H100_TT = {"gpus_per_node": 8, "gpu_memory_gb": 96, "device": "cuda", "peak_tflops": 989.0, "hbm_gbps": 2400.0,
           "intra_node_gbps": 450.0, "inter_node_gbps": 50.0, "nics_per_node": 8}
# the tutorial: 8 x A100 80 GB, NVLink (600 GB/s both ways), bf16; no network facts are given
A100 = {"gpus_per_node": 8, "gpu_memory_gb": 80, "device": "cuda", "peak_tflops": 312.0, "hbm_gbps": 2039.0,
        "intra_node_gbps": 300.0, "inter_node_gbps": 25.0, "nics_per_node": 8}

# (label, theirs tok/s/GPU, theirs memory GiB (tutorial: GB), what theirs used that we do not model, recipe)
ROWS = [
    ("torchtitan T1: 8B, FSDP 8, lbs 2, selective AC", 5762, "82.4", "", dict(
        model="llama-3.1-8b", nodes=1, cluster=H100_TT, mesh=(1, 8, 1, 1), seq=8192, mbs=2, gbs=16, ac="selective")),
    ("torchtitan T1: same + torch.compile", 6667, "77.0", "torch.compile", dict(
        model="llama-3.1-8b", nodes=1, cluster=H100_TT, mesh=(1, 8, 1, 1), seq=8192, mbs=2, gbs=16, ac="selective")),
    ("torchtitan T3: 8B, FSDP 128, lbs 2, selective AC", 5605, "67.0", "", dict(
        model="llama-3.1-8b", nodes=16, cluster=H100_TT, mesh=(1, 128, 1, 1), seq=8192, mbs=2, gbs=256,
        ac="selective")),
    ("torchtitan T2: 8B, FSDP 8, seq 32768, lbs 1, full AC", 3890, "83.9", "compile + Float8", dict(
        model="llama-3.1-8b", nodes=1, cluster=H100_TT, mesh=(1, 8, 1, 1), seq=32768, mbs=1, gbs=8, ac="full")),
    ("torchtitan T2: 8B, FSDP 4 x CP 2, seq 65536", 2540, "84.2", "compile + Float8; ring attention", dict(
        model="llama-3.1-8b", nodes=1, cluster=H100_TT, mesh=(1, 4, 2, 1), seq=65536, mbs=1, gbs=4, ac="full")),
    ("torchtitan T2: 8B, FSDP 2 x CP 4, seq 131072", 1071, "84.0", "compile + Float8; ring attention", dict(
        model="llama-3.1-8b", nodes=1, cluster=H100_TT, mesh=(1, 2, 4, 1), seq=131072, mbs=1, gbs=2, ac="full")),
    ("torchtitan T4: 70B, FSDP 32 x TP 8, lbs 16, full AC", 829, "71.9", "compile + Float8", dict(
        model="llama-3.1-70b", nodes=32, cluster=H100_TT, mesh=(1, 32, 1, 8), seq=8192, mbs=16, gbs=512, ac="full")),
    ("tutorial: 70B, FSDP 8 (dp_shard 8)", 1800, "65", "illustrative", dict(
        model="llama-3.1-70b", nodes=1, cluster=A100, mesh=(1, 8, 1, 1), seq=4096, mbs=1, gbs=32, ac="full",
        dtype="bfloat16")),
    ("tutorial: 70B, FSDP 4 x TP 2", 1600, "45", "illustrative", dict(
        model="llama-3.1-70b", nodes=1, cluster=A100, mesh=(1, 4, 1, 2), seq=4096, mbs=1, gbs=16, ac="full",
        dtype="bfloat16")),
    ("tutorial: 70B, HSDP 2 x 2 x TP 2", 1550, "48", "illustrative", dict(
        model="llama-3.1-70b", nodes=1, cluster=A100, mesh=(2, 2, 1, 2), seq=4096, mbs=1, gbs=16, ac="full",
        dtype="bfloat16")),
    ("tutorial: 70B, FSDP 2 x TP 2 x CP 2", 1200, "35", "illustrative", dict(
        model="llama-3.1-70b", nodes=1, cluster=A100, mesh=(1, 2, 2, 2), seq=4096, mbs=1, gbs=8, ac="full",
        dtype="bfloat16")),
]


def recipe(p: dict) -> dict:
    dr, ds, cp, tp = p["mesh"]
    mp = {"param_dtype": "bfloat16", "reduce_dtype": "float32" if p.get("dtype", "float32") == "float32" else "bfloat16"}
    return {"name": "published", "model": {"config": p["model"], "dtype": p.get("dtype", "float32")},
            "mesh": {"dp_replicate": dr, "dp_shard": ds, "cp": cp, "tp": tp},
            "tp": {"sequence_parallel": tp > 1, "loss_parallel": tp > 1},
            "cluster": {**p["cluster"], "nodes": p["nodes"], "gpu_memory_gb": 10_000},
            "train": {"seq_len": p["seq"], "micro_batch_size": p["mbs"], "global_batch_size": p["gbs"], "steps": 10,
                      "lr": 1e-4, "warmup_steps": 1, "activation_checkpointing": p["ac"], "mixed_precision": mp},
            "data": {"source": "synthetic"}}


def main() -> int:
    from meshbake.compiler.errors import Err
    from meshbake.compiler.pipeline import resolve_dict

    print("| configuration | theirs tok/s/GPU | ours tok/s/GPU | ours / theirs | ours MFU | step: compute + recompute "
          "/ TP / CP / FSDP+HSDP exposed (s) | memory: ours est. peak / theirs | theirs, not modelled |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for label, theirs, their_mem, extra, p in ROWS:
        res = resolve_dict(recipe(p))
        if isinstance(res, Err):
            print(f"| {label} | {theirs:,} | error: {res.errors[0].path}: {res.errors[0].message} | | | | | |")  # noqa: E501
            continue
        t, e = res.estimate.time, res.estimate
        fits = "" if e.total_bytes <= p["cluster"]["gpu_memory_gb"] * 1e9 * 0.9 else \
            f" (> 90% of {p['cluster']['gpu_memory_gb']} GB: does not fit)"
        mem = f"{e.total_bytes / 2**30:.1f} GiB{fits} / {their_mem}"
        print(f"| {label} | {theirs:,} | {t.tokens_per_s_gpu:,.0f} | {t.tokens_per_s_gpu / theirs:.2f} | {t.mfu:.1%} | "
              f"{t.compute_s + t.recompute_s:.2f} / {t.tp_s:.2f} / {t.cp_s:.2f} / {t.fsdp_s + t.hsdp_s:.2f} | "
              f"{mem} | {extra or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
