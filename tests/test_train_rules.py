"""Pure rules of the training loop (no process group): when to checkpoint, the LR schedule."""
import dataclasses
import json

import pytest
from meshbake.runtime import plan as P
from meshbake.runtime.train import checkpoint_due, lr_factor

from tests.helpers import ROOT, compile_, one_process_group


@pytest.fixture(scope="module")
def plan() -> P.Plan:
    b = compile_((ROOT / "recipes/tiny_cpu.yaml").read_text())
    return P.from_dict(json.loads(b.files["plan.json"]))


def with_ckpt(plan: P.Plan, **kw) -> P.Plan:
    return dataclasses.replace(plan, checkpoint=dataclasses.replace(plan.checkpoint, **kw))


def saved_steps(plan: P.Plan, stop_at: int | None = None) -> list[int]:
    last = stop_at or plan.train.steps
    return [n for n in range(1, last + 1) if checkpoint_due(plan, n, n == stop_at)]


def test_defaults_save_the_finished_model(plan):
    """every_steps 0 + save_on_exit true (the schema defaults): one checkpoint, at the end."""
    p = with_ckpt(plan, every_steps=0, save_on_exit=True)
    assert saved_steps(p) == [p.train.steps]
    assert saved_steps(p, stop_at=7) == [7]                     # preempted at step 7


def test_periodic_plus_last_and_stop(plan):
    steps = plan.train.steps
    p = with_ckpt(plan, every_steps=25, save_on_exit=True)
    assert saved_steps(p) == sorted({*range(25, steps + 1, 25), steps})
    q = with_ckpt(plan, every_steps=25, save_on_exit=False)
    assert saved_steps(q) == list(range(25, steps + 1, 25))
    assert saved_steps(with_ckpt(plan, every_steps=0, save_on_exit=False)) == []


def test_lr_warms_up_then_decays_to_min_lr(plan):
    t = plan.train
    f = [lr_factor(i, plan) for i in range(t.steps)]
    assert f[0] == pytest.approx(1 / t.warmup_steps) and f[t.warmup_steps - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[t.warmup_steps:], f[t.warmup_steps + 1:]))     # monotone decay
    assert f[-1] == pytest.approx(t.min_lr / t.lr)


def test_resume_path_is_a_start_point_not_a_loop(tmp_path):
    """checkpoint.resume: PATH starts a new run there; after a restart or requeue the run's own
    newer checkpoint wins, or every preemption would go back to PATH."""
    from meshbake.runtime.checkpoint import COMMITTED, MANIFEST, find_resume

    def committed(d):          # a whole step as verify() sees it: COMMITTED + a manifest of no files
        d.mkdir(parents=True)
        (d / COMMITTED).write_text("x\n")
        (d / MANIFEST).write_text('{"step": 1, "files": {}}\n')
        return d

    base = committed(tmp_path / "base/step-1000")
    root = tmp_path / "run/checkpoints"
    logs = []
    assert find_resume(root, str(base), logs.append) == base                   # a new run
    own = committed(root / "step-40")
    (root / "step-50.tmp").mkdir()                                             # a killed writer's
    assert find_resume(root, str(base), logs.append) == own                    # the restart
    assert any("continuing from it" in m for m in logs)
    assert find_resume(root, "auto", logs.append) == own
    with pytest.raises(FileExistsError, match="MESHBAKE_RUN_DIR"):
        find_resume(root, "never", logs.append)               # would prune/overwrite step-40
    assert find_resume(tmp_path / "fresh", "never", logs.append) is None
    with pytest.raises(FileNotFoundError):
        find_resume(tmp_path / "empty", str(tmp_path / "nope"), logs.append)


def test_a_step_saved_again_replaces_the_old_copy_atomically(tmp_path):
    """One gloo process (DCP needs a process group): step-5 saved twice holds the second
    save, and nothing else is left (no step-5.old, no step-5.tmp)."""
    import torch
    from meshbake.runtime import checkpoint as ck

    root = tmp_path / "ck"
    with one_process_group(), torch.random.fork_rng():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(m.parameters())
        m(torch.randn(2, 4)).sum().backward()
        opt.step()
        ck.save(root, 5, m, opt, {"step": 5, "scheduler": {}}, keep=2)
        with torch.no_grad():
            m.weight.add_(1.0)
        ck.save(root, 5, m, opt, {"step": 5, "scheduler": {}}, keep=2)     # the same step again
        want = m.weight.detach().clone()
        with torch.no_grad():
            m.weight.zero_()
        ck.load(root / "step-5", m, opt)
    assert torch.equal(m.weight, want), "step-5 is not the second save"
    assert sorted(p.name for p in root.iterdir()) == ["step-5"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_on_without_a_deprecation_warning(mode):
    """apply_ac turns HF's checkpointing on through transformers' current name: the old
    gradient_checkpointing_enable warned a FutureWarning into every AC run's log."""
    import warnings

    import transformers
    from meshbake.runtime.parallel import apply_ac

    cfg = transformers.AutoConfig.from_pretrained(ROOT / "tests/models/llama")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_ac(model, mode)
    assert model.is_gradient_checkpointing
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]


KEEP_CODE = """
import resource, torch
from meshbake.runtime.train import keep_host_memory
def faults():          # minor page faults of 5 steps' worth of allocating and freeing 6 x 8 MiB
    def step():
        ts = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(6)]
        del ts
    step()             # the first step grows the heap in either mode
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
import ctypes
# glibc's initial mmap threshold (128 KiB), set explicitly: a set threshold is fixed, where the default
# one rises after the first free of an mmapped chunk (to 8 MiB here), after which how many pages a step
# refaults depends on the heap's layout (CI measured 14,258 where a fresh shell gave 61,233)
ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)      # M_MMAP_THRESHOLD
before = faults()
print(before, keep_host_memory(), faults())
"""


def test_cpu_training_keeps_freed_host_memory_for_the_next_step():
    """runtime/train.py keep_host_memory (called by setup on CPU): at glibc's initial mmap threshold
    each 8 MiB block is mmapped and unmapped, so each later step faults its pages in again (5 x 6 x
    2,048 4-KiB pages = 61,440); after it, none. In a fresh process: the setting is process-wide."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", KEEP_CODE], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    before, ok, after = p.stdout.split()
    assert ok == "True"
    assert int(before) > 0.9 * 5 * 6 * 2048, before       # the default trims and refaults
    # kept: at most one block's pages touched anew (2,048: seen in 1 of 3 runs, the heap settling after
    # the switch from mmapped blocks), against 61,440 refaulted by the default
    assert int(after) <= 2048 + 100, after


def test_adamw_on_local_tensors_is_torchs_adamw_to_the_bit():
    """runtime/train.py AdamW overrides torch's PRIVATE Adam._init_group (it hands the functional
    update the DTensors' local tensors) and scale_grads replaces clip_grads_with_norm_: pinned
    here. The signature torch 2.13 has, then 3 clipped steps of both optimizers on the same
    Shard(0) / Replicate DTensor and plain parameters (two weight-decay groups, as build_optimizer
    makes): parameters, moments and steps equal bit for bit, the state still DTensors (what DCP
    checkpoints and reshards). A torch that renames, reorders or stops calling the hook fails here."""
    import inspect

    import torch
    from meshbake.runtime.train import AdamW, scale_grads
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    assert list(inspect.signature(torch.optim.Adam._init_group).parameters) == [
        "self", "group", "params_with_grad", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"], \
        "torch changed Adam._init_group, which runtime/train.py AdamW overrides: re-check that class"
    # (unwrapped: torch's Optimizer.__init__ wraps a class's step in its profiling hook once an instance exists)
    step = inspect.unwrap(torch.optim.AdamW.step)
    assert step is inspect.unwrap(torch.optim.Adam.step) and "self._init_group(" in inspect.getsource(step), \
        "torch's AdamW.step no longer goes through Adam._init_group: re-check train.AdamW"
    with one_process_group():
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        shapes = [((6, 4), [Shard(0)]), ((5, 3), [Replicate()]), ((4,), [Replicate()]), ((3,), None)]
        init = [torch.randn(s, generator=gen) for s, _ in shapes]
        grads = [[torch.randn(s, generator=gen) for s, _ in shapes] for _ in range(3)]

        def param(t, pl):
            return torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl) if pl else t.clone())

        runs = []
        for cls, clip in ((torch.optim.AdamW, "torch"), (AdamW, "local")):
            ps = [param(t, pl) for t, (_, pl) in zip(init, shapes)]
            opt = cls([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:3], "weight_decay": 0.0},
                       {"params": ps[3:], "weight_decay": 0.0}],      # one mesh per group, as build_optimizer
                      lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
            for gs in grads:
                for p, g, (_, pl) in zip(ps, gs, shapes):
                    p.grad = distribute_tensor(g.clone(), mesh, pl) if pl else g.clone()
                total = torch.tensor(7.5, dtype=torch.float64)      # > max_norm 1: every grad is scaled
                if clip == "torch":
                    for group in (ps[:3], ps[3:]):      # one device mesh per call, as the runtime did
                        torch.nn.utils.clip_grads_with_norm_(group, 1.0, total.to(torch.float32))
                else:
                    scale_grads([p.grad for p in ps], 1.0, total)
                opt.step()
            runs.append((ps, opt))
        (ref, ref_opt), (ours, opt) = runs

        def full(t):
            return t.full_tensor() if isinstance(t, DTensor) else t
        for p, q, (_, pl) in zip(ref, ours, shapes):
            assert torch.equal(full(p.detach()), full(q.detach()))
            for key in ("exp_avg", "exp_avg_sq", "step"):
                a, b = ref_opt.state[p][key], opt.state[q][key]
                assert type(a) is type(b) and torch.equal(full(a), full(b)), key
            assert isinstance(opt.state[q]["exp_avg"], DTensor) == (pl is not None)
        assert not torch.equal(ref[0].detach().full_tensor(), init[0])      # the steps did update
