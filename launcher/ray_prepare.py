"""``kiln data prepare --ray``: tokenize and pack datasets as Ray Data tasks across a cluster.

The output is the local path's (:mod:`trainer.data.prepare`) byte for byte: the same shard files,
checksums and ``manifest.json`` for the same inputs and settings, whatever the number of blocks
or nodes. That holds by construction:

1. The driver reads the sources (``load_documents``), numbers the documents and cuts them into
   ``num_blocks`` Arrow blocks.
2. Ray Data tokenizes the blocks in parallel (the local path's ``tokenize_batch``: classify,
   encode, EOS after each document), keeping each document's number.
3. The driver collects the small per-document columns (status, token count) and plans the shards
   as the local path does (``plan_shards``: the checks of skipped documents, the validation split
   by documents or by sequences, then :class:`trainer.data.shards.ShardLayout`: where each
   document's tokens start in its split's packed stream, hence every shard's extent). It creates
   the shard files at their final sizes.
4. Ray Data writes every block's tokens at their positions (``ShardLayout.write_documents``,
   ``os.pwrite``) in parallel, the call the local path makes batch after batch; the tail of each
   split shorter than one sequence is not written.
5. Ray tasks checksum the shards (``file_sha256``); the driver writes the manifest and renames the
   folder into place, as the local path does.

``data.root`` must be storage every node reaches at the same path (NFS, a shared disk): the
tasks write the shards there and the training workers read them there.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from model.tokenizer import Tokenizer, keyed_line_sample, merge_line_samples
from trainer.config import DatasetConfig, KilnConfig, SourceConfig
from trainer.data.prepare import (
    DOCUMENT_STATUS,
    MAP_BATCH_SIZE,
    LineSample,
    build_manifest,
    check_eos,
    load_documents,
    load_or_train_tokenizer,
    log_summary,
    plan_shards,
    reusable_manifest,
    staging_dir,
    tokenize_batch,
    train_tokenizer_from_config,
    write_manifest,
)
from trainer.data.shards import ShardLayout, file_sha256
from trainer.data.sources import SKIP_REASONS, classify, load_source

logger = logging.getLogger(__name__)

DOCS_PER_BLOCK = 10_000  # default block size; more blocks when the cluster has more CPUs


def prepare_all_ray(
    cfg: KilnConfig, *, force: bool = False, num_blocks: int | None = None
) -> list[dict[str, Any]]:
    """:func:`trainer.data.prepare.prepare_all` with tokenization and packing as Ray Data tasks.

    Connects to Ray first if this process has not (``ray.init()``: ``RAY_ADDRESS``, else a
    cluster started on this machine, else a new local one). The tokenizer, when missing, is
    trained on a line sample drawn by Ray tasks (:func:`train_tokenizer_on_ray`), the same lines
    the local path samples.

    Args:
        num_blocks: blocks each dataset is cut into (the unit of parallel work); default
            ``max(2 x cluster CPUs, documents / 10,000)``. The output does not depend on it.

    Returns:
        the manifest of each dataset, in config order.

    Raises:
        ValueError, FileNotFoundError: as :func:`trainer.data.prepare.prepare_all`;
            ``num_blocks < 1``.
    """
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks}; give at least 1 (or leave it unset)")
    tokenizer = load_or_train_tokenizer(
        cfg, lambda c: train_tokenizer_on_ray(c, num_blocks=num_blocks)
    )
    return [
        prepare_dataset_ray(cfg, d, tokenizer, force=force, num_blocks=num_blocks)
        for d in cfg.data.datasets
    ]


def prepare_dataset_ray(
    cfg: KilnConfig,
    ds_cfg: DatasetConfig,
    tokenizer: Tokenizer,
    *,
    force: bool = False,
    num_blocks: int | None = None,
) -> dict[str, Any]:
    """:func:`trainer.data.prepare.prepare_dataset` run as Ray Data tasks (same output).

    Returns:
        the manifest (see :mod:`trainer.data.prepare`).

    Raises:
        ValueError, FileNotFoundError: as :func:`trainer.data.prepare.prepare_dataset`.
    """
    import ray

    existing = reusable_manifest(cfg, ds_cfg, tokenizer, force=force)
    if existing is not None:
        return existing
    check_eos(tokenizer)
    docs = load_documents(cfg, ds_cfg)
    n_docs = len(docs)
    if not ray.is_initialized():
        ray.init()

    final = cfg.dataset_dir(ds_cfg.name)
    with staging_dir(final) as tmp:
        tokenized = _tokenize(docs, tokenizer, num_blocks)
        status, lengths = _document_columns(tokenized, n_docs)
        layout, skipped = plan_shards(cfg, ds_cfg, tokenizer, tmp, status, lengths)
        written = tokenized.map_batches(
            _write_block,
            fn_kwargs={"layout": layout},
            batch_format="pyarrow",
            batch_size=MAP_BATCH_SIZE,
        ).take_all()  # one small row per batch (an aggregate would shuffle)
        assert sum(r["written"] for r in written) == layout.packed_tokens, written
        del tokenized
        splits = layout.manifest_splits(_checksums(tmp, layout.files()))
        manifest = build_manifest(cfg, ds_cfg, tokenizer, n_docs, layout, skipped, splits)
        write_manifest(tmp, manifest)
    log_summary(manifest)
    return manifest


def train_tokenizer_on_ray(cfg: KilnConfig, num_blocks: int | None = None) -> Tokenizer:
    """:func:`trainer.data.prepare.train_tokenizer_from_config` with the line sample drawn by
    Ray Data tasks (:func:`sample_lines_on_ray`): the same lines, so the same tokenizer.

    Raises:
        ValueError, FileNotFoundError: as the local path.
    """
    return train_tokenizer_from_config(
        cfg, lambda c, sources: sample_lines_on_ray(c, sources, num_blocks)
    )


def sample_lines_on_ray(
    cfg: KilnConfig, sources: list[SourceConfig], num_blocks: int | None = None
) -> LineSample:
    """:func:`trainer.data.prepare.sample_tokenizer_lines` as Ray Data tasks: each block of
    documents keeps the bottom-k of its lines by :func:`model.tokenizer.line_key`
    (:func:`model.tokenizer.keyed_line_sample`) and this process merges them
    (:func:`model.tokenizer.merge_line_samples`) into the sample of the whole corpus, which is
    the local path's line for line (documents are numbered the same way, skipped ones
    included). Returns (the lines in key order, the non-blank lines seen, each source's
    documents and skipped documents by reason), as the local path."""
    import ray

    if not ray.is_initialized():
        ray.init()
    t = cfg.tokenizer
    cache = cfg.data.hf_cache_dir
    tables = [
        load_source(s, cache_dir=cache).select_columns(["text"]).with_format("arrow")[:]
        for s in sources
    ]
    source = np.repeat(np.arange(len(tables), dtype=np.int32), [len(t) for t in tables])
    table = pa.concat_tables(tables)
    n_docs = len(table)
    table = table.append_column("doc", pa.array(np.arange(n_docs, dtype=np.int64)))
    table = table.append_column("source", pa.array(source))
    blocks = _blocks(table, num_blocks)
    logger.info("sampling tokenizer lines from %d documents in %d Ray blocks", n_docs, len(blocks))
    parts = (
        ray.data.from_arrow(blocks)
        .map_batches(
            _sample_block,
            fn_kwargs={"k": t.input_sentence_size, "seed": t.seed, "n_sources": len(tables)},
            batch_format="pyarrow",
            batch_size=None,  # a whole block: contiguous documents
        )
        .iter_rows()
    )
    tally = np.zeros((len(tables), len(DOCUMENT_STATUS)), np.int64)  # (sources, status codes)

    def samples():
        for r in parts:
            tally[:] += np.asarray(r["counts"], np.int64).reshape(tally.shape)
            pairs = [(int(key), line) for key, line in zip(r["keys"], r["lines"], strict=True)]
            yield pairs, r["seen"]

    lines, seen = merge_line_samples(samples(), t.input_sentence_size)
    counts = [
        {"documents": int(row.sum()), **{r: int(row[DOCUMENT_STATUS[r]]) for r in SKIP_REASONS}}
        for row in tally
    ]
    return lines, seen, counts


def _sample_block(batch: pa.Table, *, k: int, seed: int, n_sources: int) -> pa.Table:
    """One row: the block's bottom-k lines (keys as uint64, lines), its non-blank lines, and its
    documents by source and :data:`~trainer.data.prepare.DOCUMENT_STATUS` code (flat)."""
    raw = batch.column("text").to_pylist()
    status = np.array([DOCUMENT_STATUS[classify(t)] for t in raw], dtype=np.int64)
    texts = [t if s == 0 else "" for t, s in zip(raw, status, strict=True)]
    first = batch.column("doc")[0].as_py() if len(batch) else 0
    pairs, seen = keyed_line_sample(texts, k, seed, first_doc=first)
    counts = np.zeros((n_sources, len(DOCUMENT_STATUS)), np.int64)
    np.add.at(counts, (batch.column("source").to_numpy(), status), 1)
    return pa.table(
        {
            "keys": pa.array([[key for key, _ in pairs]], type=pa.list_(pa.uint64())),
            "lines": pa.array([[line for _, line in pairs]], type=pa.list_(pa.string())),
            "seen": pa.array([seen], type=pa.int64()),
            "counts": pa.array([counts.ravel().tolist()], type=pa.list_(pa.int64())),
        }
    )


def _blocks(table: pa.Table, num_blocks: int | None) -> list[pa.Table]:
    """``table`` cut into ``num_blocks`` contiguous blocks (default: 2 per cluster CPU, at least
    one per :data:`DOCS_PER_BLOCK` rows)."""
    import ray

    n = len(table)
    if num_blocks is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        num_blocks = max(2 * cpus, math.ceil(n / DOCS_PER_BLOCK))
    num_blocks = max(1, min(num_blocks, n))
    bounds = np.linspace(0, n, num_blocks + 1).round().astype(int)
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def _tokenize(docs, tokenizer: Tokenizer, num_blocks: int | None):
    """A materialized Ray Dataset of (``doc``, ``status``, ``input_ids``, ``tokens``), one row per
    document, cut into ``num_blocks`` blocks before tokenizing."""
    import ray

    n_docs = len(docs)
    table = docs.select_columns(["text"]).with_format("arrow")[:]
    table = table.append_column("doc", pa.array(np.arange(n_docs, dtype=np.int64)))
    blocks = _blocks(table, num_blocks)
    logger.info("tokenizing %d documents in %d Ray Data blocks", n_docs, len(blocks))
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            _tokenize_block,
            fn_kwargs={"tokenizer": tokenizer},
            batch_format="pyarrow",
            batch_size=MAP_BATCH_SIZE,
        )
        .materialize()
    )


def _tokenize_block(batch: pa.Table, *, tokenizer: Tokenizer) -> pa.Table:
    out = tokenize_batch({"text": batch.column("text").to_pylist()}, tokenizer)
    ids = pa.array(out["input_ids"], type=pa.list_(pa.int32()))
    return pa.table(
        {
            "doc": batch.column("doc"),
            "status": pa.array(out["status"], type=pa.int8()),
            "input_ids": ids,
            "tokens": pa.array([len(x) for x in out["input_ids"]], type=pa.int64()),
        }
    )


def _document_columns(tokenized, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """(status (n_docs,) int8, token count (n_docs,) int64) in document order."""
    import ray

    meta = tokenized.select_columns(["doc", "status", "tokens"])
    table = pa.concat_tables(ray.get(meta.to_arrow_refs()))
    doc = table.column("doc").to_numpy()
    assert len(doc) == n_docs and np.array_equal(np.sort(doc), np.arange(n_docs))
    status = np.empty(n_docs, np.int8)
    lengths = np.empty(n_docs, np.int64)
    status[doc] = table.column("status").to_numpy()
    lengths[doc] = table.column("tokens").to_numpy()
    return status, lengths


def _write_block(batch: pa.Table, *, layout: ShardLayout) -> pa.Table:
    """Write one batch's tokens at their places in the shards; one row: the tokens written."""
    written = layout.write_documents(batch.column("doc").to_numpy(), batch.column("input_ids"))
    return pa.table({"written": pa.array([written], type=pa.int64())})


def _checksums(root: Path, files: list[str]) -> dict[str, str]:
    """sha256 of each shard file, computed by Ray tasks (a few files per task)."""
    import ray

    if not files:
        return {}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows = (
        ray.data.from_items([{"file": f} for f in files], override_num_blocks=min(len(files), cpus))
        .map_batches(_sha256_batch, fn_kwargs={"root": str(root)}, batch_format="pyarrow")
        .take_all()
    )
    return {r["file"]: r["sha256"] for r in rows}


def _sha256_batch(batch: pa.Table, *, root: str) -> pa.Table:
    files = batch.column("file").to_pylist()
    return pa.table({"file": files, "sha256": [file_sha256(Path(root) / f) for f in files]})
