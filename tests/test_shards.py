"""The shard layout (trainer.data.shards): packing, shard names and boundaries, writing in any
pieces, checksums, the manifest's split entries. Synthetic token streams, a few hundred tokens."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from trainer.data.shards import (
    ShardLayout,
    SplitShards,
    file_sha256,
    sequences_per_shard,
    shard_file,
    token_dtype,
)

SEQ_LEN = 4  # rows of 5 tokens
SHARD_TOKENS = 12  # 2 sequences per shard


def documents(seed: int = 0, n: int = 40) -> list[np.ndarray]:
    """n documents of 0-9 tokens each (0: a skipped one), ids below 400."""
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 400, size=rng.integers(0, 10), dtype=np.int32) for _ in range(n)]


def layout_of(root: Path, docs: list[np.ndarray], is_val: np.ndarray, **kw) -> ShardLayout:
    lengths = np.array([len(d) for d in docs])
    args = {"seq_len": SEQ_LEN, "shard_tokens": SHARD_TOKENS, "vocab_size": 400, **kw}
    layout = ShardLayout(root, lengths, lengths > 0, is_val, **args)
    layout.create_files()
    return layout


def ids_array(docs: list[np.ndarray]) -> pa.Array:
    return pa.array([d.tolist() for d in docs], type=pa.list_(pa.int32()))


def write(layout: ShardLayout, docs: list[np.ndarray], order: np.ndarray, pieces: int) -> int:
    """Write the documents in ``order``, cut into ``pieces`` batches; returns tokens written."""
    return sum(
        layout.write_documents(batch, ids_array([docs[i] for i in batch]))
        for batch in np.array_split(order, pieces)
        if len(batch)
    )


def read_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.bin"))}


def reference(docs: list[np.ndarray], is_val: np.ndarray, dtype=np.uint16) -> dict[str, bytes]:
    """The layout spelled out: each split's documents concatenated in order, cut after the last
    whole row, in shards of 2 rows named <split>/shard-NNNNN.bin."""
    row, per_shard = SEQ_LEN + 1, 2
    out = {}
    for split, member in (("train", ~is_val), ("validation", is_val)):
        parts = [d for d, m in zip(docs, member, strict=True) if m]
        stream = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        stream = stream[: len(stream) // row * row]
        for i, start in enumerate(range(0, len(stream), per_shard * row)):
            out[shard_file(split, i)] = stream[start : start + per_shard * row].tobytes()
    return out


def test_rules():
    assert shard_file("train", 0) == "train/shard-00000.bin"
    assert shard_file("validation", 12) == "validation/shard-00012.bin"
    assert sequences_per_shard(SEQ_LEN, SHARD_TOKENS) == 2
    assert sequences_per_shard(16, 5) == 1  # a shard holds at least one sequence
    assert sequences_per_shard(15, 1 << 20) == 65536
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    s = SplitShards(split="train", documents=3, tokens=23, row=5, shard_sequences=2)
    assert (s.sequences, s.dropped_tokens, s.sizes) == (4, 3, [2, 2])
    assert s.files == ["train/shard-00000.bin", "train/shard-00001.bin"]
    s = SplitShards(split="train", documents=3, tokens=25, row=5, shard_sequences=2)
    assert (s.sequences, s.dropped_tokens, s.sizes) == (5, 0, [2, 2, 1])


def test_boundaries_names_and_bytes(tmp_path):
    # train: 9 + 7 + 7 = 23 tokens -> 4 rows (shards of 2 and 2), 3 dropped;
    # validation: 7 tokens -> 1 row (one shard of 1), 2 dropped; document 3 is skipped (0 tokens)
    docs = [np.arange(9), np.arange(100, 107), np.arange(200, 207), np.zeros(0), np.arange(7)]
    docs = [d.astype(np.int32) for d in docs]
    is_val = np.array([False, True, False, False, False])
    layout = layout_of(tmp_path, docs, is_val)
    assert layout.files() == [
        "train/shard-00000.bin",
        "train/shard-00001.bin",
        "validation/shard-00000.bin",
    ]
    # created at their final sizes: rows of 5 uint16
    assert [(tmp_path / f).stat().st_size for f in layout.files()] == [20, 20, 10]
    assert write(layout, docs, np.arange(5), 1) == layout.packed_tokens == 25
    files = read_files(tmp_path)
    assert files == reference(docs, is_val)
    train = np.frombuffer(files["train/shard-00001.bin"], np.uint16).reshape(2, 5)
    assert train.tolist() == [[201, 202, 203, 204, 205], [206, 0, 1, 2, 3]]
    assert (layout.documents, layout.splits["train"].documents) == (4, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_written_in_pieces_equals_written_at_once(tmp_path, seed):
    docs = documents(seed)
    rng = np.random.default_rng(seed)
    is_val = (rng.random(len(docs)) < 0.3) & np.array([len(d) > 0 for d in docs])
    ways = {
        "at once": (np.arange(len(docs)), 1),
        "in order, 7 batches": (np.arange(len(docs)), 7),
        "shuffled, 5 batches": (rng.permutation(len(docs)), 5),
        "backwards, one by one": (np.arange(len(docs))[::-1], len(docs)),
    }
    results = {}
    for name, (order, pieces) in ways.items():
        root = tmp_path / name
        layout = layout_of(root, docs, is_val)
        assert write(layout, docs, order, pieces) == layout.packed_tokens
        results[name] = read_files(root)
    assert len(results["at once"]) > 4
    for name, files in results.items():
        assert files == reference(docs, is_val), name


def test_sliced_and_chunked_arrow_input(tmp_path):
    """Ray and datasets hand over slices of larger tables and chunked columns."""
    docs = documents(3)
    is_val = np.zeros(len(docs), bool)
    whole = ids_array(docs)
    layout = layout_of(tmp_path / "a", docs, is_val)
    layout.write_documents(np.arange(10, 40), whole.slice(10))
    layout.write_documents(np.arange(10), pa.chunked_array([whole.slice(0, 4), whole.slice(4, 6)]))
    assert read_files(tmp_path / "a") == reference(docs, is_val)


def sequence_reference(docs: list[np.ndarray], validation: int) -> dict[str, bytes]:
    """A split by sequences spelled out: all documents concatenated, cut after the last whole
    row; the last ``validation`` rows are validation's, the rows before train's."""
    row, per_shard = SEQ_LEN + 1, 2
    stream = np.concatenate(docs).astype(np.uint16)
    rows = len(stream) // row
    cut = (rows - validation) * row
    out = {}
    for split, part in (("train", stream[:cut]), ("validation", stream[cut : rows * row])):
        for i, start in enumerate(range(0, len(part), per_shard * row)):
            out[shard_file(split, i)] = part[start : start + per_shard * row].tobytes()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_a_split_by_sequences_cuts_one_stream(tmp_path, seed):
    docs = documents(seed)
    no_val = np.zeros(len(docs), bool)
    rng = np.random.default_rng(seed)
    for name, (order, pieces) in {
        "at once": (np.arange(len(docs)), 1),
        "shuffled, 6 batches": (rng.permutation(len(docs)), 6),
        "one by one": (np.arange(len(docs))[::-1], len(docs)),
    }.items():
        root = tmp_path / name
        layout = layout_of(root, docs, no_val, validation_sequences=5)
        assert layout.validation_split == "sequences"
        assert write(layout, docs, order, pieces) == layout.packed_tokens
        assert read_files(root) == sequence_reference(docs, 5), name
    tokens = sum(len(d) for d in docs)
    val, train = layout.splits["validation"], layout.splits["train"]
    assert val.sequences == 5 and train.sequences == tokens // 5 - 5 and train.dropped_tokens == 0
    assert val.tokens == tokens - train.tokens  # the dropped tail is validation's
    # a document counts in each split that holds some of its tokens
    starts = np.cumsum([len(d) for d in docs]) - [len(d) for d in docs]
    lens = np.array([len(d) for d in docs])
    assert train.documents == int(((starts < train.tokens) & (lens > 0)).sum())
    assert val.documents == int(((starts + lens > train.tokens) & (lens > 0)).sum())
    assert layout.documents == int((lens > 0).sum())
    assert layout_of(tmp_path / "d", docs, no_val).validation_split == "documents"
    with pytest.raises(ValueError, match="no validation document"):
        layout_of(tmp_path / "e", docs, ~no_val, validation_sequences=1)
    with pytest.raises(ValueError, match="validation_sequences <"):
        layout_of(tmp_path / "f", docs, no_val, validation_sequences=tokens // 5)


def test_checksums_and_manifest_entries(tmp_path):
    docs = documents(4)
    is_val = np.arange(len(docs)) % 4 == 0
    layout = layout_of(tmp_path, docs, is_val)
    write(layout, docs, np.arange(len(docs)), 3)
    sums = {f: file_sha256(tmp_path / f) for f in layout.files()}
    for f, sha in sums.items():
        assert sha == hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()
    splits = layout.manifest_splits(sums)
    assert list(splits) == ["train", "validation"]
    for split, entry in splits.items():
        # the manifest is compared byte for byte across preparations: keys in this order
        assert list(entry) == ["documents", "tokens", "sequences", "dropped_tokens", "shards"]
        member = is_val if split == "validation" else ~is_val
        assert entry["tokens"] == sum(len(d) for d, m in zip(docs, member, strict=True) if m)
        assert entry["tokens"] == entry["sequences"] * 5 + entry["dropped_tokens"]
        assert 0 <= entry["dropped_tokens"] < 5
        assert entry["documents"] == sum(len(d) > 0 for d, m in zip(docs, member, strict=True) if m)
        assert [s["file"] for s in entry["shards"]] == layout.splits[split].files
        assert sum(s["sequences"] for s in entry["shards"]) == entry["sequences"]
        for s in entry["shards"]:
            assert list(s) == ["file", "sequences", "sha256"]
            assert s["sha256"] == sums[s["file"]]
            assert (tmp_path / s["file"]).stat().st_size == s["sequences"] * 5 * 2
    json.dumps(splits)  # plain ints and strings
    with pytest.raises(KeyError):
        layout.manifest_splits({})


def test_a_remainder_shorter_than_one_sequence_is_dropped(tmp_path):
    # validation: 3 tokens, less than one row of 5: no shard, all dropped; train: 5 + 2 -> 1 row
    docs = [np.array(x, np.int32) for x in ([1, 2, 3], [4, 5, 6, 7, 8], [9, 10])]
    is_val = np.array([True, False, False])
    layout = layout_of(tmp_path, docs, is_val)
    assert (tmp_path / "validation").is_dir() and not any((tmp_path / "validation").iterdir())
    assert layout.write_documents(np.array([0]), ids_array(docs[:1])) == 0
    assert layout.write_documents(np.array([1, 2]), ids_array(docs[1:])) == 5
    splits = layout.manifest_splits({f: file_sha256(tmp_path / f) for f in layout.files()})
    assert splits["validation"] == {
        "documents": 1,
        "tokens": 3,
        "sequences": 0,
        "dropped_tokens": 3,
        "shards": [],
    }
    assert splits["train"]["dropped_tokens"] == 2
    assert read_files(tmp_path) == {
        "train/shard-00000.bin": np.arange(4, 9, dtype=np.uint16).tobytes()
    }


def test_uint32_ids(tmp_path):
    docs = [np.array([70_000, 1, 2, 65_536, 99_999], np.int32)]
    layout = layout_of(tmp_path, docs, np.array([False]), vocab_size=100_000)
    assert layout.dtype == np.uint32
    layout.write_documents(np.array([0]), ids_array(docs))
    assert np.fromfile(tmp_path / "train/shard-00000.bin", np.uint32).tolist() == docs[0].tolist()


def test_a_pickled_layout_writes_the_same(tmp_path):
    """Ray tasks receive the layout pickled."""
    docs = documents(5)
    is_val = np.zeros(len(docs), bool)
    layout = pickle.loads(pickle.dumps(layout_of(tmp_path, docs, is_val)))
    write(layout, docs, np.arange(len(docs)), 2)
    assert read_files(tmp_path) == reference(docs, is_val)


def test_mistakes(tmp_path):
    with pytest.raises(ValueError, match="one entry per document"):
        ShardLayout(
            tmp_path,
            np.ones(3),
            np.ones(3, bool),
            np.ones(2, bool),
            seq_len=4,
            shard_tokens=12,
            vocab_size=400,
        )
    docs = documents(6)
    layout = layout_of(tmp_path / "a", docs, np.zeros(len(docs), bool))
    with pytest.raises(ValueError, match=r"documents \[0\] have \[\d+\] tokens"):
        layout.write_documents(np.array([0]), ids_array([np.arange(20, dtype=np.int32)]))
    with pytest.raises(FileExistsError):
        layout.create_files()
