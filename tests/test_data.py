"""Data pipeline: sources, prepare (tokenize, pack, shard, manifest), packed datasets, the mixture
sampler and batches. Real text from ../shared/data, a 400-piece tokenizer, tiny sequences."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launcher import preflight
from model.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from trainer.config import KilnConfig, SourceConfig, config_from_dict
from trainer.data import prepare as prep
from trainer.data.dataset import (
    BLOCK_SIZE,
    SAMPLE_ID_STRIDE,
    SPLITS,
    MixtureSampler,
    PackedDataset,
    TrainData,
    largest_remainder,
    open_train_data,
    open_validation,
    read_manifest,
)
from trainer.data.prepare import prepare_all, prepare_dataset, token_dtype
from trainer.data.sources import classify, iter_texts, load_source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # real text beside the repo
VOCAB = 400


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]


@pytest.fixture(scope="module")
def paragraphs(shakespeare) -> list[str]:
    """Speeches of at least 80 characters (> 17 tokens each with the tiny tokenizer)."""
    return [p for p in shakespeare.split("\n\n") if len(p) >= 80][:60]


@pytest.fixture(scope="module")
def tok(shakespeare, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer([shakespeare[:20_000]], path, vocab_size=VOCAB)


def make_cfg(root: Path, datasets_: list[dict], tok: Tokenizer | None, **data) -> KilnConfig:
    tokenizer = {"vocab_size": VOCAB}
    if tok is not None:
        tokenizer["path"] = str(tok.path)
    data = {"seq_len": 16, "num_proc": 1, "validation_fraction": 0.2, "shard_tokens": 100, **data}
    return config_from_dict(
        {"tokenizer": tokenizer, "data": {"root": str(root), **data, "datasets": datasets_}}
    )


def skips(**counts: int) -> dict[str, int]:
    """A manifest's ``skipped``: the counts given, 0 for the other reasons."""
    return {"empty": 0, "invalid_utf8": 0, "missing_field": 0, "malformed_json": 0, **counts}


def one(name: str, *sources: dict, **kw) -> dict:
    return {"name": name, "sources": list(sources), **kw}


def read_split(root: Path, man: dict, split: str) -> np.ndarray:
    parts = [
        np.fromfile(root / s["file"], dtype=man["dtype"]) for s in man["splits"][split]["shards"]
    ]
    return np.concatenate(parts) if parts else np.zeros(0, man["dtype"])


def check_prepared(root: Path, man: dict, tok: Tokenizer, docs: list[str]) -> dict[str, list[str]]:
    """Check a prepared dataset against the usable documents it was made of, in order.

    Checks shard sizes and checksums, the manifest's counts, and that each split's packed stream
    is its documents' tokens with EOS after each, in order (the tail dropped). Returns the
    documents found in each split.
    """
    row = man["seq_len"] + 1
    assert man["dtype"] == "uint16"
    assert man["tokenizer"] == {"path": str(tok.path), "sha256": tok.sha256, "vocab_size": VOCAB}
    streams = {}
    for split in SPLITS:
        info = man["splits"][split]
        for shard in info["shards"]:
            raw = (root / shard["file"]).read_bytes()
            assert len(raw) == shard["sequences"] * row * 2
            assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
        assert info["sequences"] == sum(s["sequences"] for s in info["shards"])
        assert info["tokens"] == info["sequences"] * row + info["dropped_tokens"]
        assert 0 <= info["dropped_tokens"] < row
        streams[split] = read_split(root, man, split)
        assert len(streams[split]) == info["sequences"] * row
    # walk the documents: each continues exactly one split's stream where it stopped
    pos = dict.fromkeys(SPLITS, 0)
    found: dict[str, list[str]] = {s: [] for s in SPLITS}
    tail_tokens = 0
    for text in docs:
        ids = [*tok.encode(text), EOS_ID]
        hits = []
        for split, stream in streams.items():
            n = min(len(ids), len(stream) - pos[split])
            if n > 0 and stream[pos[split] : pos[split] + n].tolist() == ids[:n]:
                hits.append(split)
        if not hits:  # only a document wholly inside a dropped tail may match no stream
            assert all(pos[s] >= len(streams[s]) for s in SPLITS), text[:60]
            tail_tokens += len(ids)
            continue
        assert len(hits) == 1, text[:60]
        pos[hits[0]] += len(ids)
        found[hits[0]].append(text)
    tokens = {s: man["splits"][s]["tokens"] for s in SPLITS}
    assert sum(tokens.values()) == sum(pos.values()) + tail_tokens
    assert man["documents"]["usable"] == len(docs)
    assert man["documents"]["train"] + man["documents"]["validation"] == len(docs)
    if tail_tokens == 0:
        assert tokens == pos
        assert {s: len(v) for s, v in found.items()} == {s: man["documents"][s] for s in SPLITS}
    return found


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# prepare: formats and counts


def test_text_folder_one_document_per_file(tmp_path, tok, paragraphs):
    docs = ["\n\n".join(paragraphs[3 * i : 3 * i + 3]) + "\n" for i in range(10)]
    for i, d in enumerate(docs):
        write(tmp_path / "raw" / f"doc{i:02d}.txt", d)
    cfg = make_cfg(tmp_path / "data", [one("books", {"path": str(tmp_path / "raw")})], tok)
    (man,) = prepare_all(cfg)
    root = cfg.dataset_dir("books")
    assert json.loads((root / "manifest.json").read_text()) == man
    assert man["documents"] == {"total": 10, "usable": 10, "train": 8, "validation": 2}
    assert man["skipped"] == skips()
    found = check_prepared(root, man, tok, docs)
    assert len(found["validation"]) == 2 and not set(found["validation"]) & set(found["train"])
    assert len(man["splits"]["train"]["shards"]) > 1  # shard_tokens=100: 5 sequences per shard
    assert all(s["sequences"] == 5 for s in man["splits"]["train"]["shards"][:-1])
    # one sequence decodes back to the start of the first training document
    first = PackedDataset(root, "train")[0]
    assert first.shape == (17,) and first.dtype == np.uint16
    text = tok.decode(first)
    assert len(text) > 20 and found["train"][0].startswith(text)


def test_text_per_line_counts_blank_lines(tmp_path, tok, shakespeare):
    lines = shakespeare[:3000].split("\n")
    body = "\n".join(lines[:30]) + "\n\n   \n" + "\n".join(lines[30:60]) + "\n"
    src = write(tmp_path / "lines.txt", body)
    cfg = make_cfg(
        tmp_path / "data",
        [one("lines", {"path": str(src), "sample_by": "line"})],
        tok,
        validation_fraction=0.0,
        seq_len=8,
    )
    (man,) = prepare_all(cfg)
    usable = [x for x in body.split("\n")[:-1] if x.strip()]
    blank = len(body.split("\n")[:-1]) - len(usable)
    assert blank >= 2 and man["skipped"]["empty"] == blank
    assert man["documents"]["validation"] == 0 and not man["splits"]["validation"]["shards"]
    check_prepared(cfg.dataset_dir("lines"), man, tok, usable)
    assert man["splits"]["train"]["tokens"] == sum(len(tok.encode(x)) + 1 for x in usable)


def test_paragraph_mode(tmp_path, tok, paragraphs):
    body = "\n\n".join(paragraphs[:12]) + "\n\n \n\n" + "\n\n".join(paragraphs[12:20]) + "\n"
    src = write(tmp_path / "plays" / "a.txt", body)
    cfg = make_cfg(
        tmp_path / "data", [one("plays", {"path": str(src), "sample_by": "paragraph"})], tok
    )
    (man,) = prepare_all(cfg)
    usable = [p for p in body.split("\n\n") if p.strip()]
    # a line of spaces separates paragraphs as an empty line does: no empty document
    assert man["documents"]["total"] == len(usable) == 20
    assert man["skipped"]["empty"] == 0
    assert man["documents"]["validation"] == round(0.2 * 20)
    found = check_prepared(cfg.dataset_dir("plays"), man, tok, usable)
    assert sorted(found["train"] + found["validation"]) == sorted(usable)


def test_jsonl_with_text_field_and_missing_field(tmp_path, tok, paragraphs):
    rows = [{"id": i, "content": p} for i, p in enumerate(paragraphs[:10])]
    rows.insert(4, {"id": 99})  # no text field
    rows.insert(7, {"id": 100, "content": "  "})
    src = write(tmp_path / "raw" / "docs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(tmp_path / "data", [one("j", {"path": str(src), "text_field": "content"})], tok)
    (man,) = prepare_all(cfg)
    assert man["documents"]["total"] == 12
    assert man["skipped"] == skips(empty=1, missing_field=1)
    check_prepared(cfg.dataset_dir("j"), man, tok, paragraphs[:10])
    ds = load_source(SourceConfig(path=str(src), text_field="content"))
    assert ds.column_names == ["text"] and ds[4]["text"] is None
    with pytest.raises(ValueError, match=r"no column 'body'.*text_field"):
        load_source(SourceConfig(path=str(src), text_field="body"))
    with pytest.raises(ValueError, match=r"column 'id'.*not text"):
        load_source(SourceConfig(path=str(src), text_field="id"))


def test_parquet(tmp_path, tok, paragraphs):
    texts = [*paragraphs[:8], None]
    src = tmp_path / "raw" / "part-0.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"body": texts, "n": list(range(9))}), src)
    cfg = make_cfg(
        tmp_path / "data",
        [one("pq", {"path": str(tmp_path / "raw" / "*.parquet"), "text_field": "body"})],
        tok,
        max_skipped_fraction=0.2,  # 1 of 9
    )
    (man,) = prepare_all(cfg)
    assert man["skipped"]["missing_field"] == 1
    check_prepared(cfg.dataset_dir("pq"), man, tok, paragraphs[:8])


def test_saved_dataset_folder(tmp_path, tok, paragraphs):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": paragraphs[:9], "n": list(range(9))}).save_to_disk(folder)
    cfg = make_cfg(tmp_path / "data", [one("saved", {"path": str(folder)})], tok)
    (man,) = prepare_all(cfg)
    check_prepared(cfg.dataset_dir("saved"), man, tok, paragraphs[:9])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        tmp_path / "dict"
    )
    with pytest.raises(ValueError, match=r"DatasetDict.*one split"):
        load_source(SourceConfig(path=str(tmp_path / "dict")))


def test_sources_are_concatenated_in_order(tmp_path, tok, paragraphs):
    for i in range(3):
        write(tmp_path / "a" / f"{i}.txt", paragraphs[i])
    src_b = write(
        tmp_path / "b.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[3:6])
    )
    cfg = make_cfg(
        tmp_path / "data",
        [one("mix", {"path": str(tmp_path / "a")}, {"path": str(src_b)})],
        tok,
        validation_fraction=0.0,
    )
    (man,) = prepare_all(cfg)
    found = check_prepared(cfg.dataset_dir("mix"), man, tok, paragraphs[:6])
    assert found["train"] == paragraphs[:6]
    assert man["sources"][1]["path"] == str(src_b)


def test_output_does_not_depend_on_num_proc(tmp_path, tok, paragraphs):
    src = write(tmp_path / "a.txt", "\n\n".join(paragraphs) + "\n")
    mans, shards = [], []
    for num_proc in (1, 2):
        root = tmp_path / f"data{num_proc}"
        cfg = make_cfg(
            root, [one("d", {"path": str(src), "sample_by": "paragraph"})], tok, num_proc=num_proc
        )
        (man,) = prepare_all(cfg)
        mans.append(man)
        shards.append([p.read_bytes() for p in sorted(cfg.dataset_dir("d").rglob("*.bin"))])
    assert mans[0] == mans[1]
    assert shards[0] == shards[1] and len(shards[0]) > 2


def test_token_dtype():
    assert token_dtype(400) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


def test_prepare_all_trains_the_tokenizer_when_missing(tmp_path, shakespeare):
    src = write(tmp_path / "raw.txt", shakespeare[:20_000])
    cfg = make_cfg(
        tmp_path / "data", [one("s", {"path": str(src), "sample_by": "paragraph"})], None
    )
    assert not cfg.tokenizer_path.exists()
    (man,) = prepare_all(cfg)
    tok = Tokenizer.load(cfg.tokenizer_path)
    assert (cfg.tokenizer_path.parent / "tokenizer_meta.json").is_file()
    assert man["tokenizer"]["sha256"] == tok.sha256 and tok.vocab_size == VOCAB


# ---------------------------------------------------------------------------------------------
# prepare: bad data and re-runs


def test_missing_source_names_the_path(tmp_path, tok):
    missing = tmp_path / "nowhere" / "corpus.txt"
    cfg = make_cfg(tmp_path / "data", [one("m", {"path": str(missing)})], tok)
    with pytest.raises(FileNotFoundError, match=r"nowhere/corpus.txt.*fix"):
        prepare_all(cfg)
    with pytest.raises(FileNotFoundError, match=r"nowhere/\*\.jsonl"):
        load_source(SourceConfig(path=str(tmp_path / "nowhere" / "*.jsonl")))
    assert not cfg.dataset_dir("m").exists()


def test_empty_file_is_counted_and_only_empty_files_are_an_error(tmp_path, tok, paragraphs):
    for i in range(4):
        write(tmp_path / "raw" / f"{i}.txt", paragraphs[i])
    write(tmp_path / "raw" / "empty.txt", "")
    write(tmp_path / "raw" / "blank.txt", "\n \n\t\n")
    cfg = make_cfg(tmp_path / "data", [one("e", {"path": str(tmp_path / "raw")})], tok)
    (man,) = prepare_all(cfg)
    assert man["skipped"]["empty"] == 2 and man["documents"]["usable"] == 4

    bad = make_cfg(
        tmp_path / "data", [one("bad", {"path": str(tmp_path / "raw" / "*[ky].txt")})], tok
    )
    with pytest.raises(ValueError, match=r"'bad' has no usable document.*'empty': 2"):
        prepare_all(bad)
    assert not bad.dataset_dir("bad").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".bad")]


def test_invalid_utf8_is_counted_and_the_rest_prepared(tmp_path, tok, paragraphs):
    for i in range(5):
        write(tmp_path / "raw" / f"{i}.txt", paragraphs[i])
    write(tmp_path / "raw" / "2b.txt", b"a fine start, then \xff\xfe and \xc3( broken\n")
    cfg = make_cfg(
        tmp_path / "data",
        [one("u", {"path": str(tmp_path / "raw")})],
        tok,
        max_skipped_fraction=0.2,  # 1 of 6
    )
    (man,) = prepare_all(cfg)
    assert man["skipped"] == skips(invalid_utf8=1)
    check_prepared(cfg.dataset_dir("u"), man, tok, paragraphs[:5])
    # per line, only the broken line goes; tokenizer training skips it too
    src = SourceConfig(path=str(tmp_path / "raw" / "2b.txt"), sample_by="line")
    assert [classify(t) for t in load_source(src)["text"]] == ["invalid_utf8"]
    assert list(iter_texts([src])) == []


def test_invalid_utf8_in_jsonl_is_counted(tmp_path, tok, paragraphs):
    lines = [json.dumps({"text": p}).encode() + b"\n" for p in paragraphs[:6]]
    lines.insert(2, b'{"text": "raw bytes \xff\xfe in json"}\n')
    src = write(tmp_path / "raw.jsonl", b"".join(lines))
    cfg = make_cfg(
        tmp_path / "data", [one("uj", {"path": str(src)})], tok, max_skipped_fraction=0.2
    )
    (man,) = prepare_all(cfg)
    assert man["skipped"]["invalid_utf8"] == 1 and man["documents"]["total"] == 7
    check_prepared(cfg.dataset_dir("uj"), man, tok, paragraphs[:6])


def test_prepared_dataset_is_reused_or_refused(tmp_path, tok, paragraphs):
    src = write(tmp_path / "a.txt", "\n\n".join(paragraphs[:20]))
    ds = [one("r", {"path": str(src), "sample_by": "paragraph"})]
    cfg = make_cfg(tmp_path / "data", ds, tok)
    (man,) = prepare_all(cfg)
    manifest = cfg.dataset_dir("r") / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert prepare_all(cfg) == [man] and manifest.stat().st_mtime_ns == stamp

    other = make_cfg(tmp_path / "data", ds, tok, seq_len=32)
    with pytest.raises(ValueError, match=r"seq_len 16.*seq_len 32.*delete .*force"):
        prepare_all(other)
    (again,) = prepare_all(other, force=True)
    assert again["seq_len"] == 32 and json.loads(manifest.read_text())["seq_len"] == 32
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".r")] == []


def test_a_folder_that_is_not_a_prepared_dataset_is_left_alone(tmp_path, tok, paragraphs):
    src = write(tmp_path / "data" / "raw" / "a.txt", paragraphs[0])
    cfg = make_cfg(tmp_path / "data", [one("raw", {"path": str(src)})], tok)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_all(cfg, force=True)
    assert src.is_file()


def test_a_crash_leaves_no_dataset(tmp_path, tok, paragraphs, monkeypatch):
    src = write(tmp_path / "a.txt", "\n\n".join(paragraphs[:10]))
    cfg = make_cfg(tmp_path / "data", [one("c", {"path": str(src), "sample_by": "paragraph"})], tok)

    def crash(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep.ShardLayout, "create_files", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(cfg, cfg.data.datasets[0], tok)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".cache"]


# ---------------------------------------------------------------------------------------------
# reading: packed datasets and batches


@pytest.fixture()
def two_datasets(tmp_path, tok, paragraphs) -> KilnConfig:
    a = write(tmp_path / "a.txt", "\n\n".join(paragraphs[:30]))
    b = write(tmp_path / "b.txt", "\n\n".join(paragraphs[30:]))
    cfg = make_cfg(
        tmp_path / "data",
        [
            one("a", {"path": str(a), "sample_by": "paragraph"}, weight=3.0),
            one("b", {"path": str(b), "sample_by": "paragraph"}, weight=1.0),
        ],
        tok,
    )
    prepare_all(cfg)
    return cfg


def test_packed_dataset_reads_and_checks(two_datasets):
    root = two_datasets.dataset_dir("a")
    ds = PackedDataset(root, "train")
    man = ds.manifest
    assert len(ds) == man["splits"]["train"]["sequences"] > 5
    assert (ds.seq_len, ds.vocab_size, ds.tokenizer_sha256) == (
        16,
        VOCAB,
        man["tokenizer"]["sha256"],
    )
    stream = read_split(root, man, "train").reshape(-1, 17)
    for i in (0, 4, 5, len(ds) - 1, -1):
        assert np.array_equal(ds[i], stream[i])
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds.verify_checksums()
    assert len(PackedDataset(root, "validation")) == man["splits"]["validation"]["sequences"]

    shard = root / man["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256.*kiln data prepare"):
        PackedDataset(root, "train").verify_checksums()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"bytes, the manifest says.*kiln data prepare"):
        PackedDataset(root, "train")
    with pytest.raises(FileNotFoundError, match="kiln data prepare"):
        PackedDataset(root.parent / "nope", "train")


def test_train_and_validation_batches(two_datasets):
    data = open_train_data(two_datasets)
    inputs, y, ids = data.batch(np.arange(64))
    x = inputs["input_ids"]
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert ids.dtype == np.int64
    d, s = np.divmod(ids, SAMPLE_ID_STRIDE)
    assert set(d.tolist()) == {0, 1}
    for k in (0, 7, 63):
        row = data.datasets[d[k]][s[k]]
        assert np.array_equal(np.concatenate([x[k].numpy(), y[k, -1:].numpy()]), row)

    val = open_validation(two_datasets)
    n = len(val)
    assert n == sum(len(PackedDataset(two_datasets.dataset_dir(k), "validation")) for k in "ab")
    vinputs, _, vids = data.validation_batch(np.arange(n + 2))
    vx = vinputs["input_ids"]
    assert torch.equal(vx[n:], vx[:2]) and np.array_equal(vids[n:], vids[:2])
    assert torch.equal(val.batch(np.arange(n)).inputs["input_ids"], vx[:n])
    assert sorted(set((vids // SAMPLE_ID_STRIDE).tolist())) == [0, 1]


def test_open_checks_seq_len_and_tokenizer(two_datasets, tmp_path, shakespeare):
    wrong_len = two_datasets.model_copy(deep=True)
    wrong_len.data.seq_len = 32
    with pytest.raises(ValueError, match=r"data\.seq_len=32"):
        open_train_data(wrong_len)
    other = train_tokenizer(
        [shakespeare[20_000:]], tmp_path / "t2" / "tokenizer.model", vocab_size=VOCAB
    )
    prepare_dataset(two_datasets, two_datasets.data.datasets[1], other, force=True)
    with pytest.raises(ValueError, match="different tokenizers"):
        open_train_data(two_datasets)


# ---------------------------------------------------------------------------------------------
# the mixture sampler


def test_sampler_is_a_pure_function_of_the_index():
    args = ([100, 37, 1000], [1.0, 2.0, 0.5], 3)
    g = np.arange(5 * BLOCK_SIZE + 17)
    d, s = MixtureSampler(*args)(g)
    order = np.random.default_rng(0).permutation(len(g))
    fresh = MixtureSampler(*args)
    for chunk in np.array_split(order, 13):
        cd, cs = fresh(g[chunk])
        assert np.array_equal(cd, d[chunk]) and np.array_equal(cs, s[chunk])
    far = 10**9 + np.arange(5)
    assert np.array_equal(MixtureSampler(*args)(far)[1], MixtureSampler(*args)(far[::-1])[1][::-1])
    assert not np.array_equal(MixtureSampler([100, 37, 1000], [1.0, 2.0, 0.5], 4)(g)[1], s)
    assert ((s >= 0) & (s < np.array(args[0])[d])).all()


def test_every_epoch_is_a_permutation():
    n = 300
    _, s = MixtureSampler([n], [1.0], seed=5)(np.arange(4 * n))
    epochs = s.reshape(4, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    # in a mixture, the uses of the small dataset also go through it once per epoch
    d, s = MixtureSampler([50, 10_000], [1.0, 1.0], seed=5)(np.arange(4 * BLOCK_SIZE))
    uses = s[d == 0]
    for k in range(len(uses) // 50):
        assert sorted(uses[50 * k : 50 * (k + 1)].tolist()) == list(range(50))


def test_mixture_weights_are_exact_per_block():
    d, _ = MixtureSampler([10_000, 10_000], [3.0, 1.0], seed=0)(np.arange(6 * BLOCK_SIZE))
    for block in d.reshape(6, BLOCK_SIZE):
        assert np.bincount(block, minlength=2).tolist() == [768, 256]
    d, _ = MixtureSampler([7, 7, 7], [1.0, 1.0, 1.0], seed=0)(np.arange(2 * BLOCK_SIZE))
    assert np.bincount(d[:BLOCK_SIZE]).tolist() == [342, 341, 341]
    assert largest_remainder(np.array([0.2, 0.5, 0.3]), 7).tolist() == [1, 4, 2]
    assert largest_remainder(np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 1024).sum() == 1024


def test_ranks_splitting_a_global_batch_do_not_collide():
    lengths, weights, gbs = [5000, 3000], [3.0, 1.0], 64
    whole = MixtureSampler(lengths, weights, 11)
    seen = set()
    for step in range(20):
        g = step * gbs + np.arange(gbs)
        d, s = whole(g)
        per_rank = [MixtureSampler(lengths, weights, 11)(part) for part in np.array_split(g, 2)]
        rd = np.concatenate([p[0] for p in per_rank])
        rs = np.concatenate([p[1] for p in per_rank])
        assert np.array_equal(rd, d) and np.array_equal(rs, s)
        pairs = set(zip(d.tolist(), s.tolist(), strict=True))
        assert len(pairs) == gbs and not pairs & seen  # within an epoch no sample repeats
        seen |= pairs


def test_sampler_errors():
    with pytest.raises(ValueError, match="one weight per dataset"):
        MixtureSampler([10, 10], [1.0], 0)
    with pytest.raises(ValueError, match="at least one sequence"):
        MixtureSampler([10, 0], [1.0, 1.0], 0)
    with pytest.raises(ValueError, match=">= 0"):
        MixtureSampler([10], [1.0], 0)(np.array([-1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MixtureSampler([10, 10], [1.0, 1e-6], 0)
    assert any("get no sample" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="no training sequence"):
        TrainData([_FakeEmpty()], [1.0], 0)


class _FakeEmpty:
    name, seq_len = "tiny", 16

    def __len__(self) -> int:
        return 0


def test_preflight_hashes_every_shard_before_a_run_starts(two_datasets, caplog):
    """A shard with flipped bytes (same size, so opening it passes) is refused by the pre-flight
    with the fix, unless data.verify_checksums=false; all shards of both datasets are hashed."""
    cfg = two_datasets
    with caplog.at_level(logging.INFO, logger="launcher.preflight"):
        preflight.prepare(cfg)
    n = sum(
        len(PackedDataset(cfg.dataset_dir(d), s).shards())
        for d in ("a", "b")
        for s in ("train", "validation")
    )
    assert f"verified {n} shards" in caplog.text
    man = read_manifest(cfg.dataset_dir("b"))
    shard = cfg.dataset_dir("b") / man["splits"]["validation"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard .*shard-00000.bin does not match its sha256.*"
                       r"kiln data prepare"):  # fmt: skip
        preflight.prepare(cfg)
    cfg.data.verify_checksums = False
    preflight.prepare(cfg)  # knowingly skipped
