"""Raw text sources through Hugging Face ``datasets``: text, json/jsonl, parquet, saved datasets.

:func:`load_source` turns one :class:`~trainer.config.SourceConfig` into a ``datasets.Dataset``
with a single ``text`` column (``str``, or ``None`` where a record lacks the text field);
:func:`classify` says whether a document is usable and, if not, why; :func:`iter_texts` streams
the usable documents of several sources (for tokenizer training).

Invalid UTF-8 does not crash the load: the ``text`` builder decodes with the error handler
:data:`INVALID_UTF8_HANDLER`, which turns each undecodable byte ``0xNN`` (always >= 0x80) into the
private-use character ``U+10FFNN``; json, parquet and saved text columns that hold such bytes
(Arrow's JSON reader lets them through) are decoded again with it. (Python's ``surrogateescape``
would be the natural choice, but Arrow refuses strings with lone surrogates.) :func:`classify`
then reports such a document as ``invalid_utf8``. A genuine text using these 128 private-use code
points is misreported the same way; they have no public meaning.
"""

from __future__ import annotations

import codecs
import glob
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import datasets
import pyarrow as pa

from trainer.config import SourceConfig

INVALID_UTF8_HANDLER = "kiln_mark_invalid_utf8"
_MARK_BASE = 0x10FF00
# Marked bytes, and lone surrogates should a string ever carry them (surrogateescape).
_INVALID_RE = re.compile("[\U0010ff80-\U0010ffff\ud800-\udfff]")

SkipReason = Literal["empty", "invalid_utf8", "missing_field"]
SKIP_REASONS: tuple[SkipReason, ...] = ("empty", "invalid_utf8", "missing_field")

_SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _mark_invalid_utf8(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    bad = err.object[err.start : err.end]
    return "".join(chr(_MARK_BASE + b) for b in bad), err.end


codecs.register_error(INVALID_UTF8_HANDLER, _mark_invalid_utf8)


def classify(text: str | None) -> SkipReason | None:
    """Why a document is skipped, or None when it is usable.

    ``missing_field``: None (the record had no text field); ``empty``: only whitespace;
    ``invalid_utf8``: the file held bytes that are not UTF-8 (see the module docstring).
    """
    if text is None:
        return "missing_field"
    if not text.strip():
        return "empty"
    if _INVALID_RE.search(text):
        return "invalid_utf8"
    return None


def infer_format(path: Path) -> Literal["text", "json", "parquet", "saved"] | None:
    """The format of a file (by suffix, compression suffixes ignored) or a folder (``saved``
    when it holds ``dataset_info.json``/``state.json``/``dataset_dict.json``); None if unknown."""
    if path.is_dir():
        return "saved" if any((path / m).is_file() for m in _SAVED_MARKERS) else None
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None  # type: ignore[return-value]


def resolve_files(pattern: str) -> list[Path]:
    """The files a source path names: a file, every non-hidden file under a folder (recursively),
    or the files a glob matches (``**`` allowed); sorted.

    Raises:
        FileNotFoundError: nothing matches.
    """
    p = Path(pattern).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [
            f
            for f in sorted(p.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        ]
    else:
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(
            f"data source {pattern!r} matches no file (resolved from {Path.cwd()}); fix "
            f"data.datasets[].sources[].path to an existing file, folder or glob"
        )
    return files


def load_source(src: SourceConfig, *, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Load one source as a ``datasets.Dataset`` with a single column ``text`` (str or None).

    ``format=None`` infers it: a folder holding a saved dataset is ``saved``; otherwise the files
    (the path itself, the files of a folder, or a glob's matches) are read by their suffix
    (``.txt`` text, ``.json``/``.jsonl`` json, ``.parquet``), which must agree. Text files give
    one row per file, per blank-line paragraph or per line (``sample_by``); other formats take
    the column ``text_field``. Row order follows the sorted file names, then the file.

    Args:
        src: the source config.
        cache_dir: where ``datasets`` caches its Arrow conversion (default: its own cache).

    Raises:
        FileNotFoundError: the path matches nothing.
        ValueError: the format cannot be inferred or the files mix formats; the text field is
            absent or not text; a saved dataset holds several splits.
    """
    p = Path(src.path).expanduser()
    fmt = src.format
    if fmt == "saved" or (fmt is None and p.is_dir() and infer_format(p) == "saved"):
        if not p.is_dir():
            raise FileNotFoundError(
                f"saved dataset folder {src.path!r} does not exist; fix the source path (a "
                f"folder written by datasets.Dataset.save_to_disk)"
            )
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(
                f"{src.path} holds a DatasetDict with splits {list(ds)}; point the source path "
                f"at one split's folder, e.g. {p / next(iter(ds))}"
            )
        return _text_column(ds, src, cache_dir)
    files = resolve_files(src.path)
    if fmt is None:
        found = {f: infer_format(f) for f in files}
        unknown = [str(f) for f, k in found.items() if k is None]
        if unknown:
            raise ValueError(
                f"cannot infer the format of {unknown[:3]} from the suffix (source "
                f"{src.path!r}); set the source's format to text, json or parquet"
            )
        kinds = set(found.values())
        if len(kinds) > 1:
            raise ValueError(
                f"source {src.path!r} mixes formats {sorted(kinds)}; split it into one source "
                f"per format"
            )
        fmt = kinds.pop()
    data_files = [str(f) for f in files]
    cache = str(cache_dir) if cache_dir is not None else None
    if fmt == "text":
        ds = datasets.load_dataset(
            "text",
            data_files=data_files,
            split="train",
            sample_by=src.sample_by,
            encoding_errors=INVALID_UTF8_HANDLER,
            cache_dir=cache,
        )
        return ds
    ds = datasets.load_dataset(fmt, data_files=data_files, split="train", cache_dir=cache)
    return _text_column(ds, src, cache_dir)


def _text_column(
    ds: datasets.Dataset, src: SourceConfig, cache_dir: str | Path | None
) -> datasets.Dataset:
    field = src.text_field
    if field not in ds.column_names:
        raise ValueError(
            f"source {src.path!r} has no column {field!r} (columns: {ds.column_names}); set the "
            f"source's text_field to the column that holds the text"
        )
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"column {field!r} of source {src.path!r} holds {feature}, not text; set the "
            f"source's text_field to a string column"
        )
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if feature.dtype != "string":
        ds = ds.cast(datasets.Features({"text": datasets.Value("string")}))
    if _has_invalid_utf8(ds):
        ds = _mark_invalid_rows(ds, cache_dir)
    return ds


def _has_invalid_utf8(ds: datasets.Dataset) -> bool:
    """Whether any string holds bytes that are not UTF-8 (Arrow's JSON reader and foreign parquet
    files let them through; turning them into Python strings would raise)."""
    for table in ds.with_format("arrow").iter(batch_size=10_000):
        try:
            table.column("text").validate(full=True)
        except pa.ArrowInvalid:
            return True
    return False


def _decode_marked(table: pa.Table) -> pa.Table:
    raw = table.column("text").cast(pa.binary()).to_pylist()
    texts = [None if b is None else b.decode("utf-8", INVALID_UTF8_HANDLER) for b in raw]
    return pa.table({"text": pa.array(texts, pa.string())})


def _mark_invalid_rows(ds: datasets.Dataset, cache_dir: str | Path | None) -> datasets.Dataset:
    """Decode the text column again with :data:`INVALID_UTF8_HANDLER`, so that :func:`classify`
    sees the bad rows instead of a crash. Written under ``cache_dir`` (in memory without one),
    never beside the source files."""
    fingerprint = f"{ds._fingerprint}-kiln-utf8"[-64:]
    kwargs: dict = {"keep_in_memory": True}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"kiln-utf8-{fingerprint}.arrow")}
    return (
        ds.with_format("arrow")
        .map(
            _decode_marked,
            batched=True,
            new_fingerprint=fingerprint,
            desc="mark invalid UTF-8",
            **kwargs,
        )
        .with_format(None)
    )


def iter_texts(
    sources: Iterable[SourceConfig],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 1000,
    keep_positions: bool = False,
) -> Iterator[str]:
    """Stream the usable documents of ``sources`` in order (skipped ones per :func:`classify`).

    With ``keep_positions`` a skipped document yields ``""`` instead, so the i-th text is the
    i-th document of the sources (the numbering the tokenizer's line sample keys on).

    Raises:
        as :func:`load_source`.
    """
    for src in sources:
        ds = load_source(src, cache_dir=cache_dir)
        for batch in ds.iter(batch_size=batch_size):
            for text in batch["text"]:
                if classify(text) is None:
                    yield text
                elif keep_positions:
                    yield ""
