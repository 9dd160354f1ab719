"""Batches as a pure function of (step, micro-step, dp rank): resumable from one number.

The data is a stream of samples (windows of seq_len tokens). Global sample g is window
perm_e[g mod W] of epoch e = g div W (W windows; perm_e a seeded permutation per epoch), so every
window is seen exactly once per epoch. Optimizer step s reads global samples
[base + s*G, base + (s+1)*G) (G = global batch); micro-step m of dp rank r takes mbs of them at
base + s*G + (m*dp + r)*mbs. Only the dp coordinate (dp_replicate x dp_shard) picks samples:
tp and cp peers read the same ones. A single process reading all G samples sees exactly the
same tokens, which the parity tests use.

Data position (in the checkpoint): samples_consumed = base + steps*G, the number of global
samples read so far. A resume sets base = samples_consumed - step*G, so the next step reads the
next unseen samples whatever the new dp size (or global batch) is: a dp reshard changes which
rank reads a sample, never which samples come next.

Sources: `synthetic` (a seeded bigram stream, no files) or the memory-mapped windows written by
runtime/prepare.py (a rank reads only its own rows).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import safeio
from .errors import UserError
from .plan import DataPlan, Plan, TrainPlan

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor              # (B, T) long
    labels: torch.Tensor                 # (B, T) long, next token; -100 = no loss
    position_ids: torch.Tensor | None    # (B, T) long, restarting per document; None = 0..T-1


class Stream:
    """Sample g -> window index; shared by the synthetic and the prepared data."""
    windows: int | None = None           # None: an endless stream (synthetic)

    def __init__(self, train: TrainPlan, dp: int):
        self.seq_len, self.mbs, self.dp = train.seq_len, train.micro_batch_size, dp
        self.global_batch, self.seed = train.global_batch_size, train.seed
        self.base = 0                    # global samples consumed before step 0 of this run
        self._perm: tuple[int, torch.Tensor] | None = None

    def window(self, g: int) -> int:
        if self.windows is None:
            return g
        epoch, i = divmod(g, self.windows)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.windows, generator=gen))
        return int(self._perm[1][i])

    def first_sample(self, step: int, micro: int, dp_rank: int) -> int:
        return self.base + step * self.global_batch + (micro * self.dp + dp_rank) * self.mbs

    def micro_batch(self, step: int, micro: int, dp_rank: int) -> Batch:
        first = self.first_sample(step, micro, dp_rank)
        return self.rows([self.window(first + j) for j in range(self.mbs)])

    def global_batch_rows(self, step: int) -> list[int]:
        first = self.base + step * self.global_batch
        return [self.window(first + j) for j in range(self.global_batch)]

    def loss_tokens(self, step: int) -> int:
        """Tokens with a label in the whole global batch of this step (every rank's): the loss is
        the sum over them divided by this, whatever rank or micro-step a token lands on."""
        return self.global_batch * self.seq_len

    # ------------------------------------------------------------------- position (checkpoint)
    def state(self, steps_done: int) -> dict:
        return {"samples_consumed": self.base + steps_done * self.global_batch, "windows": self.windows}

    def restore(self, state: dict | None, step: int) -> None:
        if state and "samples_consumed" in state:
            self.base = int(state["samples_consumed"]) - step * self.global_batch

    def rows(self, idx: list[int]) -> Batch:
        raise NotImplementedError


class TokenData(Stream):
    """synthetic: a learnable stream, a fixed random successor table (a bigram language) with
    10% noise; sample i is seq_len + 1 tokens (inputs [:-1], labels [1:])."""

    def __init__(self, data: DataPlan, train: TrainPlan, dp: int):
        super().__init__(train, dp)
        self.vocab = data.vocab_size
        self.table = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(self.seed))

    def sample(self, i: int) -> torch.Tensor:
        return synthetic(i, self.seq_len + 1, self.table, self.seed)

    def rows(self, idx: list[int]) -> Batch:
        x = torch.stack([self.sample(i) for i in idx])                    # (mbs, T+1)
        return Batch(x[:, :-1], x[:, 1:], None)

    def global_batch_tokens(self, step: int) -> torch.Tensor:
        return torch.stack([self.sample(i) for i in self.global_batch_rows(step)])


class PackedData(Stream):
    """The memory-mapped windows of one split of a prepared directory."""

    def __init__(self, folder: Path, train: TrainPlan, dp: int):
        super().__init__(train, dp)
        self.folder = Path(folder)
        self.input_ids = windows_npy(self.folder / "input_ids.npy")      # (W, T) int32
        self.labels = windows_npy(self.folder / "labels.npy")
        self.position_ids = windows_npy(self.folder / "position_ids.npy")
        self.windows = int(self.input_ids.shape[0])
        if self.input_ids.shape[1] != self.seq_len or self.labels.shape != self.input_ids.shape \
                or self.position_ids.shape != self.input_ids.shape:
            raise UserError(self.folder, f"windows of {self.input_ids.shape[1]} tokens (labels {self.labels.shape}, "
                            f"position_ids {self.position_ids.shape}), the plan's seq_len is {self.seq_len}",
                            "run `meshbake prepare RECIPE` again")
        self._count: dict[int, int] = {}

    def rows(self, idx: list[int]) -> Batch:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a[idx], dtype=np.int64))
        return Batch(t(self.input_ids), t(self.labels), t(self.position_ids))

    def loss_tokens(self, step: int) -> int:
        if step not in self._count:
            rows = self.global_batch_rows(step)
            self._count = {step: int((np.asarray(self.labels[sorted(rows)]) != IGNORE).sum())}
        return self._count[step]

    def eval_batches(self, dp_rank: int) -> list[Batch]:
        """This dp rank's share of every eval window, in micro-batches; ranks with fewer windows
        get all-masked filler batches so every rank runs the same number of forwards (FSDP and
        TP collectives must match)."""
        per_round = self.dp * self.mbs
        rounds = -(-self.windows // per_round)
        out = []
        for k in range(rounds):
            idx = [k * per_round + dp_rank * self.mbs + j for j in range(self.mbs)]
            real = [i for i in idx if i < self.windows]
            b = self.rows(real + [0] * (self.mbs - len(real)))
            if len(real) < self.mbs:
                b.labels[len(real):] = IGNORE
            out.append(b)
        return out


def windows_npy(path: Path) -> np.ndarray:
    """One (W, T) int32 array of a prepared split, memory-mapped read-only from a regular file
    opened without following a symlink (np.load(path, mmap_mode=) opens the path itself and
    follows one planted there: training would read whatever file it names). The header is
    checked before mapping: 2-D C-order int32, and the file as long as the header says."""
    with safeio.open_regular(path) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"format version {version}")
            shape, fortran, dtype = read[version](f)
        except ValueError as e:
            raise UserError(safeio.printable(path), f"is not a .npy file meshbake wrote ({e})",
                            "run `meshbake prepare RECIPE` again") from None
        size = os.fstat(f.fileno()).st_size
        if dtype != np.int32 or fortran or len(shape) != 2 or size < f.tell() + shape[0] * shape[1] * 4:
            raise UserError(safeio.printable(path), f"holds {dtype} {shape} in {size} bytes, not the (windows, "
                            "seq_len) int32 meshbake writes", "run `meshbake prepare RECIPE` again")
        if shape[0] * shape[1] == 0:
            return np.zeros(shape, np.int32)
        return np.memmap(f, dtype=np.int32, mode="r", offset=f.tell(), shape=shape)   # maps a dup of the fd


def load_data(plan: Plan, dp: int, folder: Path | None = None) -> tuple[Stream, PackedData | None, dict]:
    """(train stream, eval split or None, index.json) for the plan; prepared data is located
    (and checked against the plan and the sources) unless `folder` is given."""
    if plan.data.format == "synthetic":
        return TokenData(plan.data, plan.train, dp), None, {}
    from .prepare import locate, read_index

    folder = Path(folder) if folder is not None else locate(plan)
    index = read_index(folder)          # bounded, a regular file, the shape meshbake writes
    if index is None:
        raise UserError(safeio.printable(folder / "index.json"), "is missing", "run `meshbake prepare RECIPE` again")
    split = {name: _split_dir(folder, name) for name in ("train", "eval")}
    if split["train"] is None:
        raise UserError(safeio.printable(folder / "train"), "is missing", "run `meshbake prepare RECIPE` again")
    ev = PackedData(split["eval"], plan.train, dp) if split["eval"] is not None else None
    return PackedData(split["train"], plan.train, dp), ev, index


def _split_dir(folder: Path, name: str) -> Path | None:
    """folder/name if a real directory (lstat: a symlink there is refused), None if absent."""
    try:
        st = os.lstat(folder / name)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(safeio.printable(folder / name), "is not a directory meshbake prepared (a symbolic link or "
                        "a file)", "remove it and run `meshbake prepare RECIPE` again")
    return folder / name


def synthetic(i: int, n: int, table: torch.Tensor, seed: int) -> torch.Tensor:
    """A learnable stream: a fixed random successor table (a bigram language) with 10% noise."""
    vocab = len(table)
    g = torch.Generator().manual_seed(seed * 7919 + i)
    noise = (torch.rand(n, generator=g) < 0.1).tolist()
    rand = torch.randint(vocab, (n,), generator=g).tolist()
    succ = table.tolist()
    out = [rand[0]]
    for t in range(1, n):
        out.append(rand[t] if noise[t] else succ[out[-1]])
    return torch.tensor(out, dtype=torch.long)
