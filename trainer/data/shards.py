"""The shard layout of a prepared dataset: how each split's tokens are packed into sequences, cut
into shard files, written, checksummed and listed in ``manifest.json``.

A split's *stream* is its documents' token ids (each ending in EOS) concatenated in document
order. The stream is cut into non-overlapping sequences of ``seq_len + 1`` tokens (inputs
``s[:-1]``, labels ``s[1:]``); the tail shorter than one sequence is dropped and counted. The
sequences are stored in order in ``<split>/shard-00000.bin``, ``<split>/shard-00001.bin``, ...
(:func:`shard_file`), :func:`sequences_per_shard` sequences each and the last one shorter; a shard
is the raw token ids in native byte order with no header (what ``ndarray.tofile`` writes), uint16
or uint32 by :func:`token_dtype`. The manifest's entry for a split is :meth:`SplitShards.entry`.

The validation split is usually a choice of whole documents: then each split's stream is its own
documents'. When the documents are too few for that (see :mod:`trainer.data.prepare`), it is cut
from one stream of all documents instead: the last ``validation_sequences`` whole sequences are
validation's, the sequences before them train's (the document at the boundary is in both).

Both preparations write through :class:`ShardLayout`: the local one (:mod:`trainer.data.prepare`)
batch after batch in document order, the Ray one (:mod:`launcher.ray_prepare`) from parallel tasks
in any order. Every document's tokens have a fixed place in the shards, so the bytes do not
depend on how the documents are batched, ordered or spread over processes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from trainer.data.dataset import SPLITS


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of a shard's token ids: uint16 when every id fits (vocab_size <= 65536), else
    uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sequences_per_shard(seq_len: int, shard_tokens: int) -> int:
    """Sequences of ``seq_len + 1`` tokens in a full shard: as many as fit in ``shard_tokens``
    tokens, at least one."""
    return max(1, shard_tokens // (seq_len + 1))


def shard_file(split: str, index: int) -> str:
    """The path of shard ``index`` (from 0) of ``split``, relative to the dataset folder, as the
    manifest names it: ``train/shard-00000.bin``."""
    return f"{split}/shard-{index:05d}.bin"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, hex, read 4 MiB at a time.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split whose stream holds ``tokens`` tokens.

    Attributes:
        split: ``"train"`` or ``"validation"``.
        documents: usable documents in the split (counted in the manifest, not used for layout).
        tokens: tokens in the split's stream, EOS included, before packing.
        row: tokens per sequence, ``seq_len + 1``.
        shard_sequences: sequences per full shard (:func:`sequences_per_shard`).
    """

    split: str
    documents: int
    tokens: int
    row: int
    shard_sequences: int

    @property
    def sequences(self) -> int:
        """Whole sequences in the stream."""
        return self.tokens // self.row

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the tail shorter than one sequence, not written."""
        return self.tokens - self.sequences * self.row

    @property
    def sizes(self) -> list[int]:
        """Sequences in each shard, in order: full shards, then the rest (if any) in a last one."""
        full, rest = divmod(self.sequences, self.shard_sequences)
        return [self.shard_sequences] * full + ([rest] if rest else [])

    @property
    def files(self) -> list[str]:
        """Each shard's path relative to the dataset folder (:func:`shard_file`), in order."""
        return [shard_file(self.split, i) for i in range(len(self.sizes))]

    def entry(self, checksums: Mapping[str, str]) -> dict[str, Any]:
        """The split's entry in ``manifest.json``::

            {"documents", "tokens", "sequences", "dropped_tokens",
             "shards": [{"file": "train/shard-00000.bin", "sequences", "sha256"}, ...]}

        (keys in this order: the manifest is compared byte for byte across preparations).

        Args:
            checksums: the sha256 (hex) of every shard, by :attr:`files` name (more are ignored).

        Raises:
            KeyError: a shard has no checksum.
        """
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "dropped_tokens": self.dropped_tokens,
            "shards": [
                {"file": f, "sequences": n, "sha256": checksums[f]}
                for f, n in zip(self.files, self.sizes, strict=True)
            ],
        }


class ShardLayout:
    """Where every document's tokens go in a dataset's shards under ``root``: its split, its
    offset in that split's stream (an exclusive cumulative sum of token counts in document order)
    and so its shard and the position in it.

    Use: :meth:`create_files` once, then :meth:`write_documents` for every document, in batches
    of any size and order, from any number of processes (each writes its own byte ranges of the
    files with ``os.pwrite``), then :meth:`manifest_splits` with the files' checksums. The object
    pickles, so Ray tasks can carry it.

    Args:
        root: the dataset folder the shards are written in (the split folders are created there).
        lengths: (n_docs,) int, each document's token count, EOS included; 0 for a skipped one.
        usable: (n_docs,) bool, the documents that are not skipped (for the manifest's counts).
        is_val: (n_docs,) bool, the documents of the validation split; the others are train's.
        seq_len: tokens per sequence minus one (``data.seq_len``).
        shard_tokens: tokens per shard at most, unless one sequence is longer
            (``data.shard_tokens``).
        vocab_size: the tokenizer's, for the ids' dtype (:func:`token_dtype`).
        validation_sequences: 0 to split by documents (``is_val``); else the validation split is
            the last this many whole sequences of the stream of all documents (``is_val`` all
            False), and a document counts in each split that holds some of its tokens (one the
            boundary cuts in both; those wholly in the dropped tail in validation).

    Raises:
        ValueError: ``lengths``, ``usable`` and ``is_val`` have different shapes; a split by
            sequences with documents in ``is_val``, or leaving no training sequence.
    """

    def __init__(
        self,
        root: str | Path,
        lengths: np.ndarray,
        usable: np.ndarray,
        is_val: np.ndarray,
        *,
        seq_len: int,
        shard_tokens: int,
        vocab_size: int,
        validation_sequences: int = 0,
    ) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        usable, is_val = np.asarray(usable, dtype=bool), np.asarray(is_val, dtype=bool)
        if not lengths.shape == usable.shape == is_val.shape or lengths.ndim != 1:
            raise ValueError(
                f"lengths, usable and is_val need one entry per document, got shapes "
                f"{lengths.shape}, {usable.shape}, {is_val.shape}"
            )
        self.root = Path(root)
        self.row = seq_len + 1
        self.dtype = token_dtype(vocab_size)
        self.lengths, self.usable, self.is_val = lengths, usable, is_val
        self.start = np.zeros(len(lengths), np.int64)  # (n_docs,) offset in its split's stream
        self.splits: dict[str, SplitShards] = {}
        per_shard = sequences_per_shard(seq_len, shard_tokens)
        # split by sequences: train's stream is all documents; past `boundary` it is validation's
        self.boundary: int | None = None
        if validation_sequences:
            total = int(lengths.sum()) // self.row
            if is_val.any() or not 0 < validation_sequences < total:
                raise ValueError(
                    f"a split by sequences needs no validation document and 0 < "
                    f"validation_sequences < {total} (the sequences in all), got "
                    f"{int(is_val.sum())} documents and {validation_sequences} sequences"
                )
            self.boundary = (total - validation_sequences) * self.row
            self.start = np.cumsum(lengths) - lengths
            in_train = usable & (self.start < self.boundary)
            in_val = usable & (self.start + lengths > self.boundary)
            tokens = {"train": self.boundary, "validation": int(lengths.sum()) - self.boundary}
            for split, member in (("train", in_train), ("validation", in_val)):
                self.splits[split] = SplitShards(
                    split=split,
                    documents=int(member.sum()),
                    tokens=tokens[split],
                    row=self.row,
                    shard_sequences=per_shard,
                )
            return
        for split, member in (("train", ~is_val), ("validation", is_val)):
            n = np.where(member, lengths, 0)
            self.start[member] = (np.cumsum(n) - n)[member]
            self.splits[split] = SplitShards(
                split=split,
                documents=int((usable & member).sum()),
                tokens=int(n.sum()),
                row=self.row,
                shard_sequences=per_shard,
            )

    @property
    def validation_split(self) -> str:
        """How the validation split was made: ``"documents"`` or ``"sequences"``."""
        return "documents" if self.boundary is None else "sequences"

    @property
    def documents(self) -> int:
        """Usable documents, all splits (once each)."""
        return int(self.usable.sum())

    @property
    def packed_tokens(self) -> int:
        """Tokens that land in the shards, all splits: what :meth:`write_documents` returns in
        total once every document is written."""
        return sum(s.sequences * self.row for s in self.splits.values())

    def files(self) -> list[str]:
        """Every shard's path relative to :attr:`root`, train's then validation's."""
        return [f for split in SPLITS for f in self.splits[split].files]

    def create_files(self) -> None:
        """Create the split folders and every shard file at its final size (zeros).

        Raises:
            FileExistsError: a split folder exists already.
        """
        itemsize = self.dtype.itemsize
        for split in SPLITS:
            s = self.splits[split]
            (self.root / split).mkdir(parents=True)
            for f, n in zip(s.files, s.sizes, strict=True):
                with open(self.root / f, "wb") as fh:
                    fh.truncate(n * self.row * itemsize)

    def write_documents(self, doc: np.ndarray, input_ids: pa.Array | pa.ChunkedArray) -> int:
        """Write the tokens of documents ``doc`` at their places in the shards.

        Args:
            doc: (n,) int, the documents' numbers (their index in ``lengths``), in any order.
            input_ids: n lists of int token ids, the documents' tokens (EOS included), row ``i``
                being document ``doc[i]``'s; cast to the shard dtype.

        Returns:
            tokens written: those past a split's last whole sequence are dropped.

        Raises:
            ValueError: a document's tokens are not as many as ``lengths`` said.
            IndexError: a document number is out of range.
        """
        doc = np.asarray(doc, dtype=np.int64)
        if isinstance(input_ids, pa.ChunkedArray):
            input_ids = input_ids.combine_chunks()
        offsets = input_ids.offsets.to_numpy()  # into the unsliced values, as .values gives them
        values = input_ids.values.to_numpy()
        lens = np.diff(offsets)
        if not np.array_equal(lens, self.lengths[doc]):
            bad = np.flatnonzero(lens != self.lengths[doc])[:5]
            raise ValueError(
                f"documents {doc[bad].tolist()} have {lens[bad].tolist()} tokens, the layout "
                f"was made for {self.lengths[doc[bad]].tolist()}"
            )
        order = np.argsort(doc, kind="stable")
        written = 0
        for split in SPLITS:
            rows = order[self.is_val[doc[order]] == (split == "validation")]
            rows = rows[lens[rows] > 0]  # skipped documents have no tokens
            if not len(rows):
                continue
            starts = self.start[doc[rows]]
            # documents next to each other in the stream form one piece, written at once
            breaks = np.flatnonzero(starts[1:] != starts[:-1] + lens[rows[:-1]]) + 1
            for piece in np.split(np.arange(len(rows)), breaks):
                tokens = np.concatenate([values[offsets[r] : offsets[r + 1]] for r in rows[piece]])
                written += self.write(split, int(starts[piece[0]]), tokens)
        return written

    def write(self, split: str, start: int, ids: np.ndarray) -> int:
        """Write ``ids`` ((n,) int, cast to the shard dtype) at token offset ``start`` of
        ``split``'s stream, across shard boundaries; returns the tokens written (those past the
        last whole sequence are dropped). The files must exist (:meth:`create_files`). In a split
        by sequences, train's stream goes on into validation's past its last sequence."""
        if self.boundary is not None and split == "train" and start + len(ids) > self.boundary:
            cut = max(0, self.boundary - start)
            head = self._write("train", start, ids[:cut]) if cut else 0
            return head + self._write("validation", start + cut - self.boundary, ids[cut:])
        return self._write(split, start, ids)

    def _write(self, split: str, start: int, ids: np.ndarray) -> int:
        s = self.splits[split]
        shard_len = s.shard_sequences * self.row
        end = min(start + len(ids), s.sequences * self.row)
        itemsize = self.dtype.itemsize
        pos = start
        while pos < end:
            shard, offset = divmod(pos, shard_len)
            n = min(end - pos, shard_len - offset)
            chunk = np.ascontiguousarray(ids[pos - start : pos - start + n], dtype=self.dtype)
            fd = os.open(self.root / shard_file(split, shard), os.O_WRONLY)
            try:
                view = memoryview(chunk).cast("B")
                at = offset * itemsize
                while view:  # pwrite may write less than asked
                    k = os.pwrite(fd, view, at)
                    view, at = view[k:], at + k
            finally:
                os.close(fd)
            pos += n
        return max(0, end - start)

    def manifest_splits(self, checksums: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The manifest's ``splits``: each split's :meth:`SplitShards.entry`, train first.

        Args:
            checksums: the sha256 (hex) of every shard by its path relative to :attr:`root`
                (:func:`file_sha256` of each of :meth:`files`).

        Raises:
            KeyError: a shard has no checksum.
        """
        return {split: self.splits[split].entry(checksums) for split in SPLITS}
