"""Reading prepared datasets: memory-mapped packed sequences, a stateless mixture sampler, batches.

Sample ids: the sequence ``s`` of dataset ``d`` (its index in ``data.datasets``) has the id
``d * 2**40 + s`` (:data:`SAMPLE_ID_STRIDE`); validation sequences use the same scheme over the
validation splits. Ids are ``int64`` and identify a sample across runs and resumes.

The training order is a pure function of ``(seed, logical index, exclusions)``: logical index
``i`` reads global index ``g = skip_excluded(i, E)`` (the ``i``-th global index not in the sorted
exclusion list ``E``, which the health supervisor's rollbacks add to and checkpoints keep), and
global index ``g`` reads the sequence :class:`MixtureSampler` maps it to. What is excluded is a
draw (a global index), not a sequence: a later epoch may draw the same sequence again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trainer.config import KilnConfig
from trainer.objectives import TRAIN_STREAM, VALIDATION_STREAM, Batch, CausalLM, Objective

FORMAT_VERSION = 1  # of manifest.json and the shard layout (see trainer.data.prepare)
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation")
SAMPLE_ID_STRIDE = 1 << 40
BLOCK_SIZE = 1024
_RERUN = "re-run `kiln data prepare CONFIG --force` to prepare it again"


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset.

    Raises:
        FileNotFoundError: the dataset is not prepared.
    """
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: dataset {Path(dataset_dir).name!r} is not prepared; run "
            f"`kiln data prepare CONFIG`"
        )
    return json.loads(path.read_text())


class PackedDataset:
    """The packed sequences of one split of a prepared dataset.

    Shards are memory-mapped lazily (on first access to each) and their sizes checked against
    the manifest when the dataset is opened.

    Args:
        path: the dataset folder (``<data.root>/<name>``).
        split: ``"train"`` or ``"validation"``.

    Raises:
        FileNotFoundError: the dataset is not prepared.
        ValueError: unknown split; the manifest's format is not this version's; a shard is
            missing or its size disagrees with the manifest.
    """

    def __init__(self, path: str | Path, split: Literal["train", "validation"] = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {SPLITS}")
        self.path = Path(path)
        self.split = split
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path} has manifest format {self.manifest.get('format_version')}, this "
                f"code reads {FORMAT_VERSION}; {_RERUN}"
            )
        self.name: str = self.manifest["name"]
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.tokenizer_sha256: str = self.manifest["tokenizer"]["sha256"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._shards = self.manifest["splits"][split]["shards"]
        row_bytes = (self.seq_len + 1) * self.dtype.itemsize
        for shard in self._shards:
            f = self.path / shard["file"]
            if not f.is_file():
                raise ValueError(
                    f"shard {f} named in {self.path}/manifest.json is missing; {_RERUN}"
                )
            want = shard["sequences"] * row_bytes
            if f.stat().st_size != want:
                raise ValueError(
                    f"shard {f} has {f.stat().st_size} bytes, the manifest says {want} "
                    f"({shard['sequences']} sequences of {self.seq_len + 1} {self.dtype.name}); "
                    f"the dataset is damaged or was changed: {_RERUN}"
                )
        counts = np.array([s["sequences"] for s in self._shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Number of sequences in the split."""
        return int(self._ends[-1]) if len(self._ends) else 0

    def _shard(self, j: int) -> np.ndarray:
        mm = self._maps.get(j)
        if mm is None:
            shard = self._shards[j]
            f = self.path / shard["file"]
            want = shard["sequences"] * (self.seq_len + 1) * self.dtype.itemsize
            size = f.stat().st_size if f.is_file() else None
            if size != want:  # changed since it was opened (a reader may be another process)
                raise ValueError(
                    f"shard {f} has {'no file' if size is None else f'{size} bytes'} now, the "
                    f"manifest says {want} bytes: the dataset was damaged or changed while in "
                    f"use: {_RERUN}"
                )
            mm = np.memmap(
                f,
                dtype=self.dtype,
                mode="r",
                shape=(shard["sequences"], self.seq_len + 1),
            )
            self._maps[j] = mm
        return mm

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i``: ``(seq_len + 1,)`` of the shard dtype (uint16 or uint32), a copy.

        Raises:
            IndexError: ``i`` is out of range.
        """
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.name}/{self.split} ({n})")
        j = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[j - 1]) if j else 0
        return np.array(self._shard(j)[i - start])

    def get_many(self, indices: np.ndarray) -> np.ndarray:
        """Sequences ``indices`` (n,) as ``(n, seq_len + 1) int64``."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for k, i in enumerate(np.asarray(indices).tolist()):
            out[k] = self[i]
        return out

    def shards(self) -> list[tuple[Path, str]]:
        """The split's shard files with the sha256 the manifest records for each."""
        return [(self.path / s["file"], s["sha256"]) for s in self._shards]

    def verify_checksums(self) -> None:
        """Hash every shard of the split and compare with the manifest.

        Raises:
            ValueError: a shard's sha256 differs.
        """
        for f, sha in self.shards():
            check_shard(f, sha)

    def __getstate__(self) -> dict:
        # memory maps are reopened lazily in the receiving process
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, {self.split!r}, sequences={len(self)})"


def check_shard(path: Path, sha256: str) -> int:
    """Hash the shard ``path`` (16 MiB reads) and compare with the manifest's ``sha256``.
    Returns its size in bytes.

    Raises:
        ValueError: the bytes differ from what was prepared (the message says how to redo it).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise ValueError(f"shard {path} does not match its sha256 in the manifest; {_RERUN}")
    return path.stat().st_size


def verify_shards(dataset_dirs: Sequence[Path], threads: int | None = None) -> tuple[int, int]:
    """Hash every shard of both splits of the prepared datasets in ``dataset_dirs`` against their
    manifests (sizes are checked whenever a split is opened; this finds flipped bytes), in
    ``threads`` threads (hashlib releases the GIL; default: one per CPU). sha256 runs at about
    1.4 GiB/s per core on the 2-core CI machine.

    Returns:
        ``(shards, bytes)`` verified.

    Raises:
        ValueError: a shard is missing, has another size, or another sha256 (the first found).
    """
    files = [f for d in dataset_dirs for split in SPLITS for f in PackedDataset(d, split).shards()]
    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        sizes = list(pool.map(lambda f: check_shard(*f), files))
    return len(files), sum(sizes)


class MixtureSampler:
    """Which sequence of which dataset each global sample index reads: a pure function of
    ``(seed, global index)``, with no state.

    Global indices are cut into blocks of :data:`BLOCK_SIZE`. In every block dataset ``i`` owns a
    fixed number of slots, ``slots[i]``, from the weights by largest-remainder rounding (so the
    slots add up to the block size and the weights are realised exactly per block); the slot
    positions inside block ``b`` are a permutation seeded by ``(seed, b)``. The ``k``-th use of
    dataset ``i`` (counting over all blocks) reads epoch ``e = k // len_i`` at position
    ``perm(seed, i, e)[k % len_i]``, a seeded permutation per epoch. So any index is computed
    without the ones before it, each epoch of a dataset visits every sequence once, and ranks
    that split a global batch never collide.

    Args:
        lengths: sequences per dataset, each > 0.
        weights: relative shares, each > 0.
        seed: any int.

    Raises:
        ValueError: mismatched lengths, an empty dataset, or a weight <= 0.
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if len(lengths) != len(weights) or not lengths:
            raise ValueError(
                f"need one weight per dataset, got {len(lengths)} lengths and {len(weights)} "
                f"weights"
            )
        if any(n <= 0 for n in lengths):
            raise ValueError(f"every dataset needs at least one sequence, got lengths {lengths}")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be > 0, got {weights}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = int(seed) % (1 << 64)
        self.slots = largest_remainder(self.weights, BLOCK_SIZE)
        if (self.slots == 0).any():
            warnings.warn(
                f"datasets {np.flatnonzero(self.slots == 0).tolist()} get no sample: their "
                f"weight is below 1/{2 * BLOCK_SIZE} of the total (weights {weights})",
                stacklevel=2,
            )
        self._base = np.repeat(np.arange(len(lengths)), self.slots)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset per position (B,), uses of that dataset before the position in the block)."""
        hit = self._blocks.get(b)
        if hit is not None:
            self._blocks.move_to_end(b)
            return hit
        owner = self._base[np.random.default_rng([self.seed, 0, b]).permutation(BLOCK_SIZE)]
        rank = np.empty(BLOCK_SIZE, dtype=np.int64)
        for d in range(len(self.lengths)):
            where = owner == d
            rank[where] = np.arange(int(where.sum()))
        self._blocks[b] = (owner, rank)
        if len(self._blocks) > 64:
            self._blocks.popitem(last=False)
        return owner, rank

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        hit = self._perms.get(key)
        if hit is not None:
            self._perms.move_to_end(key)
            return hit
        n = int(self.lengths[d])
        perm = np.random.default_rng([self.seed, 1, d, epoch]).permutation(n)
        if n < 1 << 31:
            perm = perm.astype(np.int32)  # half the memory of a large dataset's epoch
        self._perms[key] = perm
        if len(self._perms) > 2 * len(self.lengths) + 2:
            self._perms.popitem(last=False)
        return perm

    def __call__(self, global_indices: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Map global sample indices ``(n,)`` (any int dtype, >= 0) to ``(dataset_idx (n,) int64,
        seq_idx (n,) int64)``.

        Raises:
            ValueError: a negative index.
        """
        g = np.asarray(global_indices, dtype=np.int64).reshape(-1)
        if (g < 0).any():
            raise ValueError("global sample indices must be >= 0")
        blocks, pos = np.divmod(g, BLOCK_SIZE)
        ds = np.empty_like(g)
        local = np.empty_like(g)
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            owner, rank = self._block(b)
            d = owner[pos[sel]]
            ds[sel] = d
            local[sel] = b * self.slots[d] + rank[pos[sel]]
        seq = np.empty_like(g)
        epoch, offset = np.divmod(local, self.lengths[ds])
        for d, e in set(zip(ds.tolist(), epoch.tolist(), strict=True)):
            sel = (ds == d) & (epoch == e)
            seq[sel] = self._perm(d, e)[offset[sel]]
        return ds, seq


def skip_excluded(logical: np.ndarray | Sequence[int], excluded: np.ndarray) -> np.ndarray:
    """The global sample indices that logical indices read when the sorted global indices
    ``excluded`` are left out of the order: logical index ``i`` maps to the ``i``-th global
    index not in ``excluded`` (a pure function of ``(i, excluded)``).

    With ``E`` sorted and unique, ``E[j] - j`` counts the kept indices below ``E[j]``, so ``i``
    maps to ``i + #{j : E[j] - j <= i}``: one binary search per index, O(log |E|).

    Args:
        logical: (n,) int, each >= 0.
        excluded: (E,) int64, sorted, unique, each >= 0 (:meth:`TrainData.exclude` keeps it so).

    Returns:
        (n,) int64 global indices, none of them in ``excluded``; increasing where ``logical`` is.
    """
    i = np.asarray(logical, dtype=np.int64).reshape(-1)
    if len(excluded) == 0:
        return i
    kept_below = excluded - np.arange(len(excluded), dtype=np.int64)
    return i + np.searchsorted(kept_below, i, side="right")


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (Hamilton's method): ``(n,) int64``
    summing to ``total``; ties go to the lower index."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    out = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - out), kind="stable")
    out[order[: total - int(out.sum())]] += 1
    return out


def _as_batch(
    objective: Objective, rows: np.ndarray, indices: np.ndarray, stream: int, ids: np.ndarray
) -> Batch:
    return objective(rows.astype(np.int64), indices, stream)._replace(sample_ids=ids)


class ValidationData:
    """The validation splits of several datasets, concatenated in config order, read in order,
    turned into batches by ``objective`` (default: causal LM).

    Raises:
        ValueError: the datasets disagree on seq_len.
    """

    def __init__(
        self, datasets: Sequence[PackedDataset], objective: Objective | None = None
    ) -> None:
        _check_same_seq_len(datasets)
        self.datasets = list(datasets)
        self.objective = objective or CausalLM()
        self._ends = np.cumsum([len(d) for d in self.datasets], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """Sequences ``indices % len(self)`` of the concatenation, no shuffle.

        Returns:
            a :class:`~trainer.objectives.Batch` (causal LM: inputs ``input_ids`` (n, seq_len),
            labels (n, seq_len), int64), sample_ids (n,) int64 ``dataset_idx * 2**40 +
            seq_idx`` within that dataset's validation split. Random objectives draw from
            ``indices % len(self)``.

        Raises:
            ValueError: there is no validation sequence at all.
        """
        n = len(self)
        if n == 0:
            raise ValueError(
                "no validation sequences: the datasets' validation splits are empty; raise "
                "data.validation_fraction (or shorten data.seq_len) and re-run `kiln data "
                "prepare CONFIG --force`"
            )
        i = np.asarray(indices, dtype=np.int64).reshape(-1) % n
        d = np.searchsorted(self._ends, i, side="right")
        s = i - np.concatenate([[0], self._ends])[d]
        rows = np.stack([self.datasets[a][b] for a, b in zip(d.tolist(), s.tolist(), strict=True)])
        return _as_batch(self.objective, rows, i, VALIDATION_STREAM, d * SAMPLE_ID_STRIDE + s)


class TrainData:
    """Training batches from a weighted mixture of packed datasets.

    Args:
        datasets: the train splits, in config order.
        weights: relative shares, one per dataset.
        seed: the sampler's seed (``data.seed``).
        validation: the validation splits, for :meth:`validation_batch` (optional).
        objective: turns packed rows into batches (default: causal LM).

    Raises:
        ValueError: the datasets disagree on seq_len, or as :class:`MixtureSampler`.
    """

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        weights: Sequence[float],
        seed: int,
        validation: Sequence[PackedDataset] | None = None,
        objective: Objective | None = None,
    ) -> None:
        _check_same_seq_len(datasets)
        empty = [d.name for d in datasets if len(d) == 0]
        if empty:
            raise ValueError(
                f"datasets {empty} have no training sequence (too little text for one sequence "
                f"of seq_len + 1 tokens); add text, shorten data.seq_len or drop them"
            )
        self.datasets = list(datasets)
        self.seq_len = self.datasets[0].seq_len
        self.sampler = MixtureSampler([len(d) for d in datasets], weights, seed)
        self.objective = objective or CausalLM()
        self.validation = (
            ValidationData(validation, self.objective) if validation is not None else None
        )
        self.excluded = np.zeros(0, dtype=np.int64)  # sorted global indices left out

    def exclude(self, global_indices: np.ndarray | Sequence[int]) -> None:
        """Leave the global sample indices ``global_indices`` (n,) out of the order from now on
        (:meth:`global_indices`); added to those already excluded.

        Raises:
            ValueError: a negative index.
        """
        g = np.asarray(global_indices, dtype=np.int64).reshape(-1)
        if (g < 0).any():
            raise ValueError("global sample indices must be >= 0")
        self.excluded = np.union1d(self.excluded, g).astype(np.int64)

    def global_indices(self, logical: np.ndarray | Sequence[int]) -> np.ndarray:
        """The global sample indices (n,) int64 that the logical indices ``logical`` (n,) read:
        the order with :attr:`excluded` left out (:func:`skip_excluded`). The training loop
        counts its data cursor in logical indices."""
        return skip_excluded(logical, self.excluded)

    def batch(self, global_indices: np.ndarray | Sequence[int]) -> Batch:
        """The samples of ``global_indices`` (n,).

        Returns:
            a :class:`~trainer.objectives.Batch`: the objective's inputs and labels (causal LM:
            ``input_ids`` (n, seq_len) and labels, the inputs shifted by one, int64), and
            sample_ids (n,) int64 ``dataset_idx * 2**40 + seq_idx``. Random objectives draw
            from the global index, so a sample is the same whichever rank reads it.
        """
        g = np.asarray(global_indices, dtype=np.int64).reshape(-1)
        d, s = self.sampler(g)
        rows = np.stack([self.datasets[a][b] for a, b in zip(d.tolist(), s.tolist(), strict=True)])
        return _as_batch(self.objective, rows, g, TRAIN_STREAM, d * SAMPLE_ID_STRIDE + s)

    def validation_batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """As :meth:`ValidationData.batch`.

        Raises:
            ValueError: opened without validation splits, or they are empty.
        """
        if self.validation is None:
            raise ValueError("TrainData was built without validation splits; pass validation=")
        return self.validation.batch(indices)


def _check_same_seq_len(datasets: Sequence[PackedDataset]) -> None:
    lens = {d.name: d.seq_len for d in datasets}
    if len(set(lens.values())) > 1:
        raise ValueError(
            f"prepared datasets disagree on seq_len: {lens}; prepare them again with one "
            f"data.seq_len (`kiln data prepare CONFIG --force`)"
        )


def _open_split(cfg: KilnConfig, split: Literal["train", "validation"]) -> list[PackedDataset]:
    if not cfg.data.datasets:
        raise ValueError("data.datasets is empty; name at least one dataset")
    out = [PackedDataset(cfg.dataset_dir(d.name), split) for d in cfg.data.datasets]
    shas = {d.name: d.tokenizer_sha256 for d in out}
    if len(set(shas.values())) > 1:
        raise ValueError(
            f"prepared datasets use different tokenizers (sha256 {shas}); prepare them all with "
            f"{cfg.tokenizer_path}: `kiln data prepare CONFIG --force`"
        )
    if cfg.tokenizer_path.is_file():
        sha = hashlib.sha256(cfg.tokenizer_path.read_bytes()).hexdigest()
        if sha not in shas.values():
            raise ValueError(
                f"the datasets were prepared with tokenizer sha256 {out[0].tokenizer_sha256[:12]}"
                f" but {cfg.tokenizer_path} has sha256 {sha[:12]}; prepare them again with this "
                f"tokenizer (`kiln data prepare CONFIG --force`) or point tokenizer.path at the "
                f"one they used"
            )
    bad = {d.name: d.seq_len for d in out if d.seq_len != cfg.data.seq_len}
    if bad:
        raise ValueError(
            f"datasets {bad} were prepared with another seq_len than data.seq_len="
            f"{cfg.data.seq_len}; set data.seq_len to theirs or prepare them again "
            f"(`kiln data prepare CONFIG --force`)"
        )
    return out


def open_train_data(cfg: KilnConfig, objective: Objective | None = None) -> TrainData:
    """The training mixture of ``cfg.data.datasets`` (weights ``weight``, seed ``data.seed``),
    with their validation splits attached, batched by ``objective`` (default: causal LM).

    Raises:
        FileNotFoundError: a dataset is not prepared.
        ValueError: the datasets disagree with each other or with the config (tokenizer sha256,
            seq_len), or a training split is empty.
    """
    train = _open_split(cfg, "train")
    validation = [PackedDataset(d.path, "validation") for d in train]
    return TrainData(
        train,
        [d.weight for d in cfg.data.datasets],
        cfg.data.seed,
        validation=validation,
        objective=objective,
    )


def open_validation(cfg: KilnConfig) -> ValidationData:
    """The validation splits of ``cfg.data.datasets`` in config order.

    Raises:
        as :func:`open_train_data`.
    """
    return ValidationData(_open_split(cfg, "validation"))
