"""Offline data preparation: train the tokenizer, then tokenize, pack and shard every dataset.

Layout of one prepared dataset, ``<data.root>/<name>/``::

    manifest.json                  counts, tokenizer hash, per-shard checksums (see below)
    train/shard-00000.bin ...      flat token ids, raw ``ndarray.tofile`` (uint16 or uint32)
    validation/shard-00000.bin ...

The shards are :mod:`trainer.data.shards`'s layout: every shard holds a whole number of
sequences of ``seq_len + 1`` tokens (inputs are ``s[:-1]``, labels ``s[1:]``). Documents are
concatenated with EOS after each, in source order, and cut into non-overlapping sequences; the
tail of each split shorter than one sequence is dropped and counted. The dataset is written into
a hidden temporary folder and renamed into place when complete, so a crash never leaves a folder
that looks prepared. The output does not depend on ``data.num_proc``.

Validation split (:func:`plan_validation`, the manifest's ``validation_split``): ``"documents"``,
a seeded choice of ``round(validation_fraction * usable documents)`` whole documents, never split
across the two, when that holds out between a third and three times the sequences the fraction
asks for; otherwise (too few documents, e.g. 2 documents at 0.03 would hold out half the tokens)
``"sequences"``: the last ``round(validation_fraction * sequences)`` sequences of the stream of
all documents, so the one document at the boundary is in both splits, with a warning that says
so and why. With ``validation_fraction > 0`` and no validation sequence possible (the whole
dataset under two sequences), preparing is refused.

Skipped documents (:func:`trainer.data.sources.classify`) are counted by reason. ``empty`` ones
hold no text; the others (``invalid_utf8``, ``missing_field``, ``malformed_json``) lose text, and
when they are more than ``data.max_skipped_fraction`` of the documents that are not empty,
preparing is refused, naming the files (the likely encoding of those that are not UTF-8, the
first malformed json lines) and the fix. Both refusals come before any shard is written.

``manifest.json``::

    {"format_version": 1, "name", "sources": [SourceConfig...], "license": str | None,
     "tokenizer": {"path", "sha256", "vocab_size"}, "seq_len", "dtype": "uint16" | "uint32",
     "seed", "validation_fraction", "validation_split": "documents" | "sequences",
     "documents": {"total", "usable", "train", "validation"},
     "skipped": {"empty", "invalid_utf8", "missing_field", "malformed_json"},
     "splits": {"train" | "validation": {"documents", "tokens", "sequences", "dropped_tokens",
                "shards": [{"file": "train/shard-00000.bin", "sequences", "sha256"}]}}}

(each split's entry is :meth:`trainer.data.shards.SplitShards.entry`)

``tokens`` counts the tokens of the split's documents, EOS included, before packing:
``tokens == sequences * (seq_len + 1) + dropped_tokens``. In a split by sequences a split's
``documents`` are those with tokens in it (a document the boundary cuts counts in both), and
validation's ``tokens`` include the dropped tail of the stream.

The ``datasets`` Arrow cache of the raw sources lives in ``<data.root>/.cache/huggingface``,
with the copies of text files that separate paragraphs by lines of spaces and of json files with
malformed lines (``kiln-copies/``, see :mod:`trainer.data.sources`); the tokenized intermediate
files live in the temporary folder and are deleted with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from model.tokenizer import (
    META_FILE,
    Tokenizer,
    sample_lines,
    train_tokenizer_on_sample,
    write_meta,
)
from trainer.config import DatasetConfig, KilnConfig, SourceConfig
from trainer.data.dataset import FORMAT_VERSION, MANIFEST_FILE, read_manifest
from trainer.data.shards import ShardLayout, file_sha256, token_dtype
from trainer.data.sources import SKIP_REASONS, classify, iter_texts, load_source, skip_details
from trainer.objectives import check_tokenizer

logger = logging.getLogger(__name__)

# A document's status code in the tokenized columns: 0 usable, else 1 + its skip reason's index.
DOCUMENT_STATUS = {None: 0, **{reason: i + 1 for i, reason in enumerate(SKIP_REASONS)}}
MAP_BATCH_SIZE = 1000  # documents per tokenizing batch (local `datasets.map` and Ray Data alike)
# A split by documents is kept when it holds out between 1/x and x times the sequences asked for.
VALIDATION_TOLERANCE = 3.0


# (lines, non-blank lines seen, per source {"documents": n, <skip reason>: n}) of the sources
LineSample = tuple[list[str], int, list[dict[str, int]]]
LineSampler = Callable[[KilnConfig, list[SourceConfig]], LineSample]


def sample_tokenizer_lines(cfg: KilnConfig, sources: list[SourceConfig]) -> LineSample:
    """The tokenizer's line sample of ``sources`` in this process (:func:`model.tokenizer
    .sample_lines`; documents numbered with the skipped ones, as the Ray path numbers them),
    the lines seen, and each source's documents and skipped documents by reason."""
    counts: list[dict[str, int]] = []
    texts = iter_texts(sources, cache_dir=cfg.data.hf_cache_dir, keep_positions=True, counts=counts)
    lines, seen = sample_lines(texts, cfg.tokenizer.input_sentence_size, cfg.tokenizer.seed)
    return lines, seen, counts


def train_tokenizer_from_config(cfg: KilnConfig, sampler: LineSampler | None = None) -> Tokenizer:
    """Train the tokenizer on a line sample of the sources of all ``cfg.data.datasets``; writes
    ``cfg.tokenizer_path`` (and ``tokenizer_meta.json`` beside it). ``sampler`` draws the sample
    (default :func:`sample_tokenizer_lines`; the Ray path draws the same lines on a cluster).
    A dataset that loses too many documents to bad records (:func:`check_skipped`) is refused
    before the tokenizer is written, so that none is trained on what is left of it.

    Raises:
        ValueError: no datasets, or the sample does not fit ``tokenizer.vocab_size`` (the message
            says what to change); ``model.init_from`` brings the tokenizer to use; a dataset
            loses too many documents (:func:`check_skipped`).
        FileNotFoundError: a source path matches nothing.
    """
    if init_from_tokenizer(cfg) is not None:
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r} brings the tokenizer the model was "
            f"trained with; `kiln data prepare` / `kiln train` copy it to {cfg.tokenizer_path}, "
            f"a new one would not fit the model"
        )
    sources = [s for d in cfg.data.datasets for s in d.sources]
    if not sources:
        raise ValueError(
            "data.datasets names no sources to train the tokenizer on; add a dataset with "
            "sources, or set tokenizer.path to an existing tokenizer.model"
        )
    t = cfg.tokenizer
    logger.info(
        "training a %s tokenizer (vocab %d) -> %s", t.model_type, t.vocab_size, cfg.tokenizer_path
    )
    sample, seen, counts = (sampler or sample_tokenizer_lines)(cfg, sources)
    for d in cfg.data.datasets:  # counts are in the order of `sources`
        mine, counts = counts[: len(d.sources)], counts[len(d.sources) :]
        skipped = {r: sum(c[r] for c in mine) for r in SKIP_REASONS}
        check_skipped(cfg, d, sum(c["documents"] for c in mine), skipped, warn=False)
    if not sample:
        paths = ", ".join(str(s.path) for s in sources)
        raise ValueError(
            f"the data sources ({paths}) hold no non-blank line of text to train the tokenizer "
            "on: they are empty or hold only whitespace; point data.datasets[].sources[].path at "
            "files with text"
        )
    tok = train_tokenizer_on_sample(
        sample,
        seen,
        cfg.tokenizer_path,
        vocab_size=t.vocab_size,
        model_type=t.model_type,
        character_coverage=t.character_coverage,
        byte_fallback=t.byte_fallback,
        num_sentinels=cfg.derived.num_sentinels,
        seed=t.seed,
    )
    logger.info("tokenizer written: %r", tok)
    return tok


def prepare_all(cfg: KilnConfig, *, force: bool = False) -> list[dict[str, Any]]:
    """Train the tokenizer if ``cfg.tokenizer_path`` is missing, then prepare every dataset.

    A dataset already prepared with the same tokenizer and ``seq_len`` is kept as it is.

    Returns:
        the manifest of each dataset, in config order.

    Raises:
        ValueError: no datasets; the tokenizer does not fit the run; a dataset was
            prepared with another tokenizer or seq_len (and not ``force``); a dataset has no
            usable document.
        FileNotFoundError: a source path matches nothing.
    """
    tokenizer = load_or_train_tokenizer(cfg)
    return [prepare_dataset(cfg, d, tokenizer, force=force) for d in cfg.data.datasets]


def load_or_train_tokenizer(
    cfg: KilnConfig, train: Callable[[KilnConfig], Tokenizer] | None = None
) -> Tokenizer:
    """The tokenizer at ``cfg.tokenizer_path``; if the file is missing, the tokenizer of
    ``model.init_from`` copied there (:func:`install_tokenizer`), else one trained there (by
    ``train``, default :func:`train_tokenizer_from_config`; the Ray path passes its own).

    Raises:
        ValueError: no datasets; the tokenizer does not fit the run
            (:func:`trainer.objectives.check_tokenizer`); the file holds another tokenizer than
            ``model.init_from``'s, or the one Kiln trained in ``data.root`` has another number
            of pieces than ``tokenizer.vocab_size`` (a ``tokenizer.path`` given is taken as is).
        FileNotFoundError: a source path matches nothing; ``model.init_from`` has no tokenizer.
    """
    if not cfg.data.datasets:
        raise ValueError("data.datasets is empty; name at least one dataset with its sources")
    source = init_from_tokenizer(cfg)
    if cfg.tokenizer_path.is_file():
        tokenizer = Tokenizer.load(cfg.tokenizer_path)
        if source is not None and source.is_file():
            check_same_tokenizer(tokenizer, Tokenizer.load(source))
        elif cfg.tokenizer.path is None and tokenizer.vocab_size != cfg.tokenizer.vocab_size:
            raise ValueError(
                f"{cfg.tokenizer_path} has {tokenizer.vocab_size} pieces and "
                f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}; the datasets of "
                f"{cfg.data.root} were tokenized with it: set "
                f"tokenizer.vocab_size={tokenizer.vocab_size} to use them, or give another "
                "data.root to train a tokenizer of the new size and prepare the data again"
            )
    elif source is not None:
        tokenizer = install_tokenizer(source, cfg.tokenizer_path)
    else:
        tokenizer = (train or train_tokenizer_from_config)(cfg)
    check_tokenizer(cfg, tokenizer)
    return tokenizer


def init_from_tokenizer(cfg: KilnConfig) -> Path | None:
    """The ``tokenizer.model`` of the ``model.init_from`` folder when the run uses it (no
    ``tokenizer.path`` set), else None."""
    if cfg.model.init_from is None or cfg.tokenizer.path is not None:
        return None
    return Path(cfg.model.init_from) / "tokenizer.model"


def install_tokenizer(source: Path, dest: Path) -> Tokenizer:
    """Copy the tokenizer ``source`` (a checkpoint's) to ``dest`` with ``tokenizer_meta.json``
    beside it, where the data, the trainer and checkpoints look for them. The metadata is
    ``source``'s own when it has one for this model, else what the model file tells (its
    training settings; ``copied_from`` names ``source``).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist (model.init_from's tokenizer) and {dest} is missing; set "
            f"tokenizer.path to the tokenizer the model was trained with"
        )
    tok = Tokenizer.load(source)
    meta_file = source.with_name(META_FILE)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if meta.get("sha256") == tok.sha256:  # the training record of this very model
        shutil.copyfile(meta_file, dest.with_name(META_FILE))
    else:
        write_meta(tok, dest.parent, copied_from=str(source))
    shutil.copyfile(source, dest.with_name(f".{dest.name}.tmp"))
    os.replace(dest.with_name(f".{dest.name}.tmp"), dest)  # last: its presence means complete
    logger.info("tokenizer of %s copied to %s", source.parent, dest)
    return Tokenizer.load(dest)


def check_same_tokenizer(have: Tokenizer, want: Tokenizer) -> None:
    """Raises ValueError, saying what to do, when ``have`` (the data root's) is not ``want``
    (``model.init_from``'s): the data must be tokenized with the model's tokenizer."""
    if have.sha256 != want.sha256:
        raise ValueError(
            f"{have.path} (sha256 {have.sha256[:12]}) is not the tokenizer of model.init_from, "
            f"{want.path} (sha256 {want.sha256[:12]}): the data must be tokenized with the "
            f"model's tokenizer; set data.root to a new folder (or delete {have.path.parent} and "
            f"the datasets prepared with it)"
        )


def prepare_dataset(
    cfg: KilnConfig, ds_cfg: DatasetConfig, tokenizer: Tokenizer, *, force: bool = False
) -> dict[str, Any]:
    """Tokenize, pack and shard one dataset into ``cfg.dataset_dir(ds_cfg.name)``.

    Skipped documents (:data:`trainer.data.sources.SKIP_REASONS`) are counted in the manifest
    and logged, with where they come from. If the folder already holds this dataset prepared with
    the same tokenizer and ``seq_len``, its manifest is returned unless ``force``.

    Returns:
        the manifest (see the module docstring).

    Raises:
        ValueError: prepared with another tokenizer or seq_len and not ``force``; the folder
            exists but is not a prepared dataset; a tokenizer without EOS; the documents cannot be
            used as they are (:func:`plan_shards`); a json source that cannot be read.
        FileNotFoundError: a source path matches nothing.
    """
    name, d = ds_cfg.name, cfg.data
    final = cfg.dataset_dir(name)
    existing = reusable_manifest(cfg, ds_cfg, tokenizer, force=force)
    if existing is not None:
        return existing
    check_eos(tokenizer)
    docs = load_documents(cfg, ds_cfg)
    n_docs = len(docs)

    with staging_dir(final) as tmp:
        status, lengths, tokenized = _tokenize(docs, tokenizer, tmp / "map-cache", d.num_proc)
        layout, skipped = plan_shards(cfg, ds_cfg, tokenizer, tmp, status, lengths)
        start = written = 0
        ids = tokenized.select_columns(["input_ids"]).with_format("arrow")
        for table in ids.iter(batch_size=MAP_BATCH_SIZE):
            doc = np.arange(start, start + table.num_rows)
            written += layout.write_documents(doc, table.column("input_ids"))
            start += table.num_rows
        assert start == n_docs and written == layout.packed_tokens, (start, written)
        del tokenized, ids
        shutil.rmtree(tmp / "map-cache", ignore_errors=True)
        splits = layout.manifest_splits({f: file_sha256(tmp / f) for f in layout.files()})

        manifest = build_manifest(cfg, ds_cfg, tokenizer, n_docs, layout, skipped, splits)
        write_manifest(tmp, manifest)
    log_summary(manifest)
    return manifest


def plan_shards(
    cfg: KilnConfig,
    ds_cfg: DatasetConfig,
    tokenizer: Tokenizer,
    root: Path,
    status: np.ndarray,
    lengths: np.ndarray,
) -> tuple[ShardLayout, dict[str, int]]:
    """The shard layout of a tokenized dataset in ``root``, its shard files created: skipped
    documents counted and checked (:func:`check_skipped`), the validation split planned
    (:func:`plan_validation`), every document placed (:class:`trainer.data.shards.ShardLayout`).
    The local and the Ray preparation share it. Every check comes before a file is created.

    Args:
        status: (n_docs,) int8, each document's :data:`DOCUMENT_STATUS` code.
        lengths: (n_docs,) int, each document's token count, EOS included (0 when skipped).

    Returns:
        (the layout, skipped documents by reason in :data:`SKIP_REASONS` order).

    Raises:
        ValueError: no usable document (:func:`check_usable`); too many lost to bad records
            (:func:`check_skipped`); not one whole sequence, or no validation sequence although
            ``data.validation_fraction > 0`` (:func:`plan_validation`).
    """
    d = cfg.data
    skipped = {r: int((status == DOCUMENT_STATUS[r]).sum()) for r in SKIP_REASONS}
    usable = status == 0
    check_usable(ds_cfg, len(status), int(usable.sum()), skipped, d.hf_cache_dir)
    check_skipped(cfg, ds_cfg, len(status), skipped)
    is_val, validation_sequences = plan_validation(cfg, ds_cfg, lengths, usable)
    layout = ShardLayout(
        root,
        lengths,
        usable,
        is_val,
        seq_len=d.seq_len,
        shard_tokens=d.shard_tokens,
        vocab_size=tokenizer.vocab_size,
        validation_sequences=validation_sequences,
    )
    layout.create_files()
    return layout, skipped


def reusable_manifest(
    cfg: KilnConfig, ds_cfg: DatasetConfig, tokenizer: Tokenizer, *, force: bool
) -> dict[str, Any] | None:
    """The manifest of ``ds_cfg`` if it is already prepared with this tokenizer and ``seq_len``
    (and not ``force``), else None: the dataset must be prepared.

    Raises:
        ValueError: prepared with another tokenizer or seq_len and not ``force``; the folder
            exists but is not a prepared dataset.
    """
    final = cfg.dataset_dir(ds_cfg.name)
    existing = _existing_manifest(final, tokenizer, cfg.data.seq_len, force)
    if existing is not None:
        if existing["sources"] != [s.model_dump() for s in ds_cfg.sources]:
            logger.warning(
                "dataset %r in %s was prepared from other sources than the config names; "
                "pass force (`kiln data prepare --force`) to prepare it again",
                ds_cfg.name,
                final,
            )
        logger.info("dataset %r already prepared in %s", ds_cfg.name, final)
    return existing


def load_documents(cfg: KilnConfig, ds_cfg: DatasetConfig) -> datasets.Dataset:
    """The raw documents of ``ds_cfg`` (its sources concatenated in order, one ``text`` column).

    Raises:
        ValueError: the dataset names no sources.
        FileNotFoundError: a source path matches nothing.
    """
    if not ds_cfg.sources:
        raise ValueError(
            f"dataset {ds_cfg.name!r} has no sources and is not prepared in "
            f"{cfg.dataset_dir(ds_cfg.name)}"
        )
    raw = [load_source(s, cache_dir=cfg.data.hf_cache_dir) for s in ds_cfg.sources]
    return raw[0] if len(raw) == 1 else datasets.concatenate_datasets(raw)


def check_eos(tokenizer: Tokenizer) -> None:
    """Raises ValueError when ``tokenizer`` has no EOS piece (packing puts one after each doc)."""
    if tokenizer.eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer.path} defines no EOS piece; packing needs one")


def check_usable(
    ds_cfg: DatasetConfig,
    n_docs: int,
    n_usable: int,
    skipped: dict,
    cache_dir: str | Path | None = None,
) -> None:
    """Raises ValueError, saying what to check and where the skipped documents come from
    (:func:`trainer.data.sources.skip_details`, sources read with ``cache_dir``), when a dataset
    has no usable document."""
    if n_usable == 0:
        found = skip_details(ds_cfg.sources, skipped, cache_dir=cache_dir)
        details = " ".join(f"{x}." for x in found)
        raise ValueError(
            f"dataset {ds_cfg.name!r} has no usable document: {n_docs} read, skipped {skipped}; "
            f"check its sources ({[s.path for s in ds_cfg.sources]}): the files are empty, "
            f"not UTF-8, not JSON, or text_field names the wrong column. {details}".rstrip()
        )


def check_skipped(
    cfg: KilnConfig,
    ds_cfg: DatasetConfig,
    n_docs: int,
    skipped: dict[str, int],
    *,
    warn: bool = True,
) -> None:
    """Check the documents a dataset lost to bad records, and say where they come from.

    Documents skipped for a reason other than ``empty`` (which hold no text: blank lines and
    paragraphs, empty files) lose text. More of them than ``data.max_skipped_fraction`` of the
    documents that are not empty is an error; fewer (but some) is a warning (if ``warn``; the
    tokenizer's sample leaves it to the preparation of the dataset). Both name the files
    (:func:`trainer.data.sources.skip_details`): the likely encoding of those that are not UTF-8
    and the command that converts them, the first malformed json lines.

    Args:
        n_docs: documents read, skipped ones included.
        skipped: skipped documents by reason (:data:`SKIP_REASONS`).

    Raises:
        ValueError: too many documents lost: what, where, and the fix (including the setting
            that accepts it).
    """
    lost = {r: n for r, n in skipped.items() if r != "empty" and n}
    if not lost:
        return
    n_lost, with_text = sum(lost.values()), n_docs - skipped.get("empty", 0)
    share, limit = n_lost / with_text, cfg.data.max_skipped_fraction
    counts = ", ".join(f"{r}={n}" for r, n in lost.items())
    if share <= limit and not warn:
        return
    found = skip_details(ds_cfg.sources, lost, cache_dir=cfg.data.hf_cache_dir)
    details = " ".join(f"{x}." for x in found)
    if share > limit:
        raise ValueError(
            f"dataset {ds_cfg.name!r} would lose {n_lost} of its {with_text} documents that hold "
            f"text ({share:.1%}: {counts}), more than data.max_skipped_fraction={limit} allows. "
            f"{details} Fix the sources and prepare again, or set data.max_skipped_fraction="
            f"{_ceil(share)} to prepare the dataset without them."
        )
    logger.warning(
        "dataset %r: %d of %d documents that hold text skipped (%.1f%%: %s). %s",
        ds_cfg.name,
        n_lost,
        with_text,
        100 * share,
        counts,
        details,
    )


def _ceil(share: float) -> float:
    """``share`` rounded up to 2 decimals (a threshold that accepts it)."""
    return min(1.0, math.ceil(share * 100) / 100)


def plan_validation(
    cfg: KilnConfig, ds_cfg: DatasetConfig, lengths: np.ndarray, usable: np.ndarray
) -> tuple[np.ndarray, int]:
    """How a dataset's validation split is made (see the module docstring): by documents, or by
    sequences when a choice of whole documents holds out less than a third or more than three
    times (:data:`VALIDATION_TOLERANCE`) the sequences ``data.validation_fraction`` asks for. A
    fallback to sequences is logged as a warning saying why.

    Args:
        lengths: (n_docs,) int, each document's token count, EOS included (0 when skipped).
        usable: (n_docs,) bool, the documents that are not skipped.

    Returns:
        (is_val (n_docs,) bool, the validation documents of a split by documents; the validation
        sequences of a split by sequences, 0 for a split by documents).

    Raises:
        ValueError: not one whole sequence in the dataset; no validation sequence possible
            although ``data.validation_fraction > 0`` (under two sequences in all).
    """
    d, name = cfg.data, ds_cfg.name
    row = d.seq_len + 1
    tokens = int(lengths.sum())
    n_seq = tokens // row
    if n_seq == 0:
        raise ValueError(
            f"dataset {name!r} holds {tokens} tokens, less than one sequence of data.seq_len + 1 "
            f"= {row}; add text to its sources or shorten data.seq_len"
        )
    fraction = d.validation_fraction
    is_val = validation_mask(len(lengths), np.flatnonzero(usable), fraction, d.seed)
    if fraction == 0:
        return is_val, 0
    if n_seq < 2:
        raise ValueError(
            f"dataset {name!r} holds {tokens} tokens, one sequence of data.seq_len + 1 = {row}: "
            f"too few to hold out data.validation_fraction={fraction} for validation and train "
            f"on the rest; add text to its sources, shorten data.seq_len, or set "
            f"data.validation_fraction=0 to train without validation"
        )
    want = min(max(1, round(fraction * n_seq)), n_seq - 1)
    got = int(lengths[is_val].sum()) // row
    trains = int(lengths[~is_val].sum()) // row
    if trains > 0 and want / VALIDATION_TOLERANCE <= got <= want * VALIDATION_TOLERANCE:
        return is_val, 0
    n_val_docs, n_usable = int(is_val.sum()), int(usable.sum())
    logger.warning(
        "dataset %r: %d usable documents are too few to split by whole documents at "
        "data.validation_fraction=%s (%d of them would hold out %d of %d sequences, %.1f%%); "
        "the validation split is the last %d sequences (%.1f%%) of the stream of all documents "
        "instead, the document at the boundary in both splits. Split the text into more "
        "documents (sources' sample_by: paragraph or line) to hold out whole documents",
        name,
        n_usable,
        fraction,
        n_val_docs,
        got,
        got + trains,
        100 * got / max(1, got + trains),
        want,
        100 * want / n_seq,
    )
    return np.zeros(len(lengths), dtype=bool), want


def build_manifest(
    cfg: KilnConfig,
    ds_cfg: DatasetConfig,
    tokenizer: Tokenizer,
    n_docs: int,
    layout: ShardLayout,
    skipped: dict[str, int],
    splits: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The manifest of a prepared dataset (see the module docstring) written as ``layout``
    says; ``splits`` maps each split to its ``documents``, ``tokens``, ``sequences``,
    ``dropped_tokens`` and ``shards``."""
    d = cfg.data
    return {
        "format_version": FORMAT_VERSION,
        "name": ds_cfg.name,
        "sources": [s.model_dump() for s in ds_cfg.sources],
        "license": ds_cfg.license,
        "tokenizer": {
            "path": str(tokenizer.path),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
        },
        "seq_len": d.seq_len,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "seed": d.seed,
        "validation_fraction": d.validation_fraction,
        "validation_split": layout.validation_split,
        "documents": {
            "total": n_docs,
            "usable": layout.documents,
            "train": splits["train"]["documents"],
            "validation": splits["validation"]["documents"],
        },
        "skipped": skipped,
        "splits": splits,
    }


def _existing_manifest(
    final: Path, tokenizer: Tokenizer, seq_len: int, force: bool
) -> dict[str, Any] | None:
    if not final.exists():
        return None
    if not (final / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{final} exists but is not a prepared dataset (no {MANIFEST_FILE}); move it away or "
            f"give the dataset another name (data.datasets[].name)"
        )
    man = read_manifest(final)
    same = (
        man.get("format_version") == FORMAT_VERSION
        and man.get("tokenizer", {}).get("sha256") == tokenizer.sha256
        and man.get("seq_len") == seq_len
    )
    if force:
        return None
    if same:
        return man
    raise ValueError(
        f"{final} was prepared with tokenizer sha256 "
        f"{str(man.get('tokenizer', {}).get('sha256'))[:12]}, seq_len {man.get('seq_len')} "
        f"(format {man.get('format_version')}), but this config uses tokenizer "
        f"{tokenizer.sha256[:12]}, seq_len {seq_len} (format {FORMAT_VERSION}); delete {final} "
        f"or pass force (`kiln data prepare --force`) to prepare it again"
    )


def tokenize_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    """A batch of documents (``{"text": [str | None]}``) -> ``{"input_ids": [[int]], "status":
    [int]}``: each document's token ids (EOS-terminated) and :data:`DOCUMENT_STATUS` code (ids
    empty when skipped). Used by the local and the Ray preparation alike."""
    status = [DOCUMENT_STATUS[classify(t)] for t in batch["text"]]
    ids = iter(
        tokenizer.encode_batch([t for t, s in zip(batch["text"], status, strict=True) if s == 0])
    )
    eos = [tokenizer.eos_id]
    return {
        "input_ids": [next(ids) + eos if s == 0 else [] for s in status],
        "status": status,
    }


def _tokenize(
    docs: datasets.Dataset, tokenizer: Tokenizer, cache: Path, num_proc: int
) -> tuple[np.ndarray, np.ndarray, datasets.Dataset]:
    """(status per document (n,) int8, tokens per document (n,) int64, dataset of ``input_ids``
    (EOS appended) and ``status``).

    The map's cache files go to ``cache`` (a folder deleted afterwards), never to the shared
    ``datasets`` cache.
    """
    cache.mkdir()
    if len(docs) == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.int64), docs
    fingerprint = hashlib.sha256(
        f"{docs._fingerprint}/{tokenizer.sha256}/kiln-tokenize-v1".encode()
    ).hexdigest()[:32]
    tokenized = docs.map(
        tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=docs.column_names,
        features=datasets.Features(
            {"input_ids": datasets.List(datasets.Value("int32")), "status": datasets.Value("int8")}
        ),
        num_proc=min(num_proc, len(docs)) if num_proc > 1 else None,
        cache_file_name=str(cache / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="tokenize",
    )
    # through Arrow: np.asarray over a datasets Column converts row by row (minutes per million)
    table = tokenized.select_columns(["status", "input_ids"]).with_format("arrow")[:]
    status = table.column("status").to_numpy().astype(np.int8, copy=False)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    return status, lengths, tokenized


def validation_mask(n_docs: int, usable: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n_docs,) bool: the documents held out for validation, a seeded choice of
    ``round(fraction * len(usable))`` usable ones (at least one, and at least one left for
    training: none of a single document). :func:`plan_validation` judges the choice."""
    is_val = np.zeros(n_docs, dtype=bool)
    n_val = min(max(1, round(fraction * len(usable))), len(usable) - 1)
    if fraction == 0 or n_val < 1:
        return is_val
    rng = np.random.default_rng(seed % (1 << 64))
    is_val[rng.choice(usable, size=n_val, replace=False)] = True
    return is_val


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh folder beside ``final`` to write a dataset into: it replaces ``final`` when the
    block completes and is deleted when the block raises, so a crash never leaves a folder that
    looks prepared."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` into a dataset folder (last: it marks the folder complete)."""
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` to ``final``, replacing an older version of it."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def log_summary(man: dict[str, Any]) -> None:
    """Log a prepared dataset's counts (sequences and tokens per split, skipped documents)."""
    skipped = man["skipped"]
    n_skipped = sum(skipped.values())
    tr, va = man["splits"]["train"], man["splits"]["validation"]
    logger.log(
        logging.WARNING if n_skipped else logging.INFO,
        "dataset %r: %d documents, %d skipped (%s); train %d docs, %d tokens -> %d sequences "
        "(%d tokens dropped); validation (by %s) %d docs, %d tokens -> %d sequences "
        "(%d dropped)",
        man["name"],
        man["documents"]["total"],
        n_skipped,
        ", ".join(f"{k}={v}" for k, v in skipped.items()),
        tr["documents"],
        tr["tokens"],
        tr["sequences"],
        tr["dropped_tokens"],
        man.get("validation_split", "documents"),
        va["documents"],
        va["tokens"],
        va["sequences"],
        va["dropped_tokens"],
    )
