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

A json source is read by the ``datasets`` json builder. When it fails, the files are checked line
by line (:func:`malformed_json_lines`): a line that is not one JSON object is a document whose
text is :data:`MALFORMED_JSON` (reported as ``malformed_json``, so counted and skipped like other
bad records, at its place in the document numbering), read from a copy of the file with such
lines replaced, written under ``cache_dir``. A failure with no malformed line is a ValueError.

In text files read by paragraph, a line of spaces and tabs separates paragraphs as an empty line
does (WikiText separates its paragraphs by lines holding one space; the ``text`` builder splits
on ``"\n\n"`` only): a file holding such lines is read from a copy under ``cache_dir`` in which
they are empty.

:func:`skip_details` says where skipped documents come from, for messages: the files that are
not UTF-8 with the encoding they most likely are in (``charset_normalizer``) and the command that
converts them, the first malformed json lines.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import datasets
import fsspec
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError
from fsspec.utils import infer_compression

from trainer.config import SourceConfig

INVALID_UTF8_HANDLER = "kiln_mark_invalid_utf8"
_MARK_BASE = 0x10FF00
# Marked bytes, and lone surrogates should a string ever carry them (surrogateescape).
_INVALID_RE = re.compile("[\U0010ff80-\U0010ffff\ud800-\udfff]")

# The text of a json line that is not one JSON object (a private-use code point no text holds).
MALFORMED_JSON = "\U0010fe00"
# A line of spaces and tabs (``\r`` of a CRLF ending allowed), in a binary chunk of whole lines.
_BLANK_LINE_RE = re.compile(rb"(?m)^[ \t]+\r?$")
_CHUNK_BYTES = 8 << 20
DETAIL_LIMIT = 5  # files and line numbers named in a message, at most

SkipReason = Literal["empty", "invalid_utf8", "missing_field", "malformed_json"]
SKIP_REASONS: tuple[SkipReason, ...] = ("empty", "invalid_utf8", "missing_field", "malformed_json")

logger = logging.getLogger(__name__)

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
    ``invalid_utf8``: the file held bytes that are not UTF-8; ``malformed_json``: the json line
    was not one JSON object (see the module docstring).
    """
    if text is None:
        return "missing_field"
    if text == MALFORMED_JSON:
        return "malformed_json"
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
    one row per file, per paragraph (separated by lines that are empty or hold only spaces and
    tabs) or per line (``sample_by``); other formats take the column ``text_field``. A json line
    that is not one JSON object is a row :data:`MALFORMED_JSON`. Row order follows the sorted
    file names, then the file.

    Args:
        src: the source config.
        cache_dir: where ``datasets`` caches its Arrow conversion, and where the copies of text
            files with blank lines of spaces and json files with malformed lines are written
            (default: the ``datasets`` cache).

    Raises:
        FileNotFoundError: the path matches nothing.
        ValueError: the format cannot be inferred or the files mix formats; the text field is
            absent or not text; a saved dataset holds several splits; a json file cannot be read
            although no line is malformed, or is one JSON array that does not parse.
    """
    fmt, files = source_files(src)
    p = Path(src.path).expanduser()
    if fmt == "saved":
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(
                f"{src.path} holds a DatasetDict with splits {list(ds)}; point the source path "
                f"at one split's folder, e.g. {p / next(iter(ds))}"
            )
        return _text_column(ds, src, cache_dir)
    cache = str(cache_dir) if cache_dir is not None else None
    if fmt == "text":
        data_files = [str(f) for f in files]
        if src.sample_by == "paragraph":
            data_files = [str(_paragraph_copy(f, cache_dir)) for f in files]
        return datasets.load_dataset(
            "text",
            data_files=data_files,
            split="train",
            sample_by=src.sample_by,
            encoding_errors=INVALID_UTF8_HANDLER,
            cache_dir=cache,
        )
    if fmt == "json":
        ds = _load_json(files, src, cache_dir)
    else:
        ds = datasets.load_dataset(
            fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache
        )
    return _text_column(ds, src, cache_dir)


def source_files(
    src: SourceConfig,
) -> tuple[Literal["text", "json", "parquet", "saved"], list[Path]]:
    """(the format of ``src``, its files in order; for ``saved`` the folder itself).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_source` (no match, a format that cannot be
            inferred or mixed formats).
    """
    p = Path(src.path).expanduser()
    fmt = src.format
    if fmt == "saved" or (fmt is None and p.is_dir() and infer_format(p) == "saved"):
        if not p.is_dir():
            raise FileNotFoundError(
                f"saved dataset folder {src.path!r} does not exist; fix the source path (a "
                f"folder written by datasets.Dataset.save_to_disk)"
            )
        return "saved", [p]
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
    return fmt, files


def _open_binary(path: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    """``path`` opened for reading bytes, decompressed by its suffix (.gz, .bz2, .xz, .zst,
    .lz4) as ``datasets`` reads it."""
    return fsspec.open(str(path), "rb", compression="infer")


def _copy_path(path: Path, kind: str, cache_dir: str | Path | None, suffix: str) -> Path:
    """Where the ``kind`` copy of ``path`` lives under ``cache_dir``: named by the file's path,
    size and modification time, so an edited file gets a new copy (and ``datasets`` a new cache
    entry) and an unchanged one reuses it."""
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{kind}"
    base = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    name = f"{path.name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}{suffix}"
    return base / "kiln-copies" / name


def _write_atomic(dest: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``dest`` through ``write(binary file)`` under a temporary name, then rename it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            write(out)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _paragraph_copy(path: Path, cache_dir: str | Path | None) -> Path:
    """``path`` itself, or when it holds lines of only spaces and tabs, a copy under
    ``cache_dir`` in which they are empty (so they separate paragraphs)."""
    found = False
    with _open_binary(path) as f:
        while chunk := f.read(_CHUNK_BYTES):
            chunk += f.readline()  # whole lines
            if _BLANK_LINE_RE.search(chunk):
                found = True
                break
    if not found:
        return path
    dest = _copy_path(path, "paragraphs", cache_dir, ".txt")
    if dest.is_file():
        return dest

    def write(out: IO[bytes]) -> None:
        with _open_binary(path) as raw:
            # decoded as the text builder decodes (universal newlines, invalid bytes marked),
            # so the copy reads back as the same text
            for line in _text_lines(raw):
                if line.strip(" \t\n"):
                    out.write(line.encode("utf-8"))
                elif line.endswith("\n"):
                    out.write(b"\n")

    _write_atomic(dest, write)
    logger.info(
        "%s has lines of only spaces or tabs; read as paragraph breaks (copy %s)", path, dest
    )
    return dest


def _text_lines(raw: IO[bytes]) -> Iterator[str]:
    """The lines of a binary file decoded as UTF-8 with invalid bytes marked
    (:data:`INVALID_UTF8_HANDLER`), newlines translated to ``\\n``, as ``open`` reads it."""
    yield from io.TextIOWrapper(raw, encoding="utf-8", errors=INVALID_UTF8_HANDLER)


def _load_json(
    files: list[Path], src: SourceConfig, cache_dir: str | Path | None
) -> datasets.Dataset:
    """The ``datasets`` json builder over ``files``; when it fails, the same over copies of the
    files with malformed lines (see the module docstring)."""
    copies = [_copy_path(f, f"json/{src.text_field}", cache_dir, ".jsonl") for f in files]
    # a copy exists where malformed lines were found before (the file unchanged since)
    first = [c if c.is_file() else f for c, f in zip(copies, files, strict=True)]
    try:
        return _json_dataset(first, src, cache_dir)
    except ValueError as err:
        failure = err
    read = []
    for f, copy, used in zip(files, copies, first, strict=True):
        bad = [] if used == copy else malformed_json_lines(f)
        if bad:
            _write_atomic(
                copy, lambda out, f=f, bad=bad: _write_json_copy(f, set(bad), src.text_field, out)
            )
            logger.info(
                "%s: %d malformed json lines (lines %s) read as skipped documents",
                f,
                len(bad),
                _some(bad),
            )
        read.append(copy if bad else used)
    if read == first:
        raise failure
    return _json_dataset(read, src, cache_dir)


def _json_dataset(
    files: list[Path], src: SourceConfig, cache_dir: str | Path | None
) -> datasets.Dataset:
    """``datasets.load_dataset("json")`` over ``files``.

    Raises:
        ValueError: the builder fails (its error message, the files named).
    """
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs an error line before raising: ours says it all
    try:
        return datasets.load_dataset(
            "json",
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except (DatasetGenerationError, pa.ArrowException) as err:
        cause = err.__cause__ or err
        raise ValueError(
            f"cannot read json source {src.path!r}: {type(cause).__name__}: {str(cause)[:300]}; "
            f"each line of a .jsonl file must be one JSON object (a .json file may also be one "
            f"JSON array of objects), with the same type for a field on every line"
        ) from None
    finally:
        quiet.setLevel(level)


def malformed_json_lines(path: Path) -> list[int]:
    """The line numbers (from 1) of the lines of a json file that are not one JSON object (blank
    lines are not records and pass). A file that is one JSON value (an array, or one object over
    several lines) has none.

    Raises:
        ValueError: the file is a JSON array (starts with ``[``) that does not parse: where, and
            what to do.
    """
    bad: list[int] = []
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
                if raw.lstrip().startswith(b"["):
                    _check_json_document(path)
                    return []
            line = raw.strip()
            if line and not _is_json_object(line):
                # a first line that does not close an object: perhaps one over several lines
                if n == 1 and not line.endswith(b"}") and _parses_as_json(path):
                    return []
                bad.append(n)
    return bad


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8", INVALID_UTF8_HANDLER)), dict)
    except ValueError:
        return False


def _read_decoded(path: Path) -> str:
    with _open_binary(path) as f:
        return f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", INVALID_UTF8_HANDLER)


def _parses_as_json(path: Path) -> bool:
    try:
        json.loads(_read_decoded(path))
    except ValueError:
        return False
    return True


def _check_json_document(path: Path) -> None:
    try:
        json.loads(_read_decoded(path))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is a JSON array that does not parse (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); fix the file there, or write it as JSON lines (.jsonl, one object a "
            f"line), where a malformed line is counted and skipped"
        ) from None


def _write_json_copy(path: Path, bad: set[int], field: str, out: IO[bytes]) -> None:
    """``path`` as JSON lines with each line of ``bad`` replaced by ``{field: MALFORMED_JSON}``
    and blank lines left out."""
    mark = json.dumps({field: MALFORMED_JSON}, ensure_ascii=False).encode() + b"\n"
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if n in bad:
                out.write(mark)
            elif raw.strip():
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")


def _some(numbers: list[int]) -> str:
    """The first :data:`DETAIL_LIMIT` numbers, comma-separated, then ``...`` if there are more."""
    head = ", ".join(str(n) for n in numbers[:DETAIL_LIMIT])
    return head + (", ..." if len(numbers) > DETAIL_LIMIT else "")


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
    counts: list[dict[str, int]] | None = None,
) -> Iterator[str]:
    """Stream the usable documents of ``sources`` in order (skipped ones per :func:`classify`).

    With ``keep_positions`` a skipped document yields ``""`` instead, so the i-th text is the
    i-th document of the sources (the numbering the tokenizer's line sample keys on). With
    ``counts``, one dict per source is appended to it as the source is read:
    ``{"documents": n, <each skip reason>: n}``.

    Raises:
        as :func:`load_source`.
    """
    for src in sources:
        ds = load_source(src, cache_dir=cache_dir)
        tally = {"documents": len(ds), **dict.fromkeys(SKIP_REASONS, 0)}
        if counts is not None:
            counts.append(tally)
        for batch in ds.iter(batch_size=batch_size):
            for text in batch["text"]:
                reason = classify(text)
                if reason is None:
                    yield text
                    continue
                tally[reason] += 1
                if keep_positions:
                    yield ""


def first_invalid_utf8(path: Path) -> tuple[int, int] | None:
    """(line from 1, byte offset from 0) of the first byte of ``path`` (decompressed) that is not
    UTF-8, or None when the whole file is UTF-8."""
    line, offset, carry = 1, 0, b""
    with _open_binary(path) as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            data = carry + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                carry, done = b"", len(data)
            except UnicodeDecodeError as err:
                if not (chunk and err.reason == "unexpected end of data"):
                    return line + data[: err.start].count(b"\n"), offset + err.start
                carry, done = data[err.start :], err.start  # a character cut by the chunk's end
            line += data[:done].count(b"\n")
            offset += done


def guess_encoding(path: Path, near: int = 0) -> str | None:
    """The most likely encoding of ``path`` (a Python codec name, e.g. ``cp1252``), from up to
    1 MiB of the file starting a little before byte ``near``: ``cp1252`` for Western European
    text (:func:`_looks_western`), else ``charset_normalizer``'s best guess; None when no text
    encoding fits (a binary file).

    ``charset_normalizer`` alone ranks cp1250 or cp1257 level with or above cp1252 for French or
    Spanish text in Latin-1, and converting from those garbles letters (``à`` is ``ŕ`` in
    cp1250); Western European text is the common case, so it is tested first."""
    from charset_normalizer import from_bytes

    skip = max(0, near - 4096)
    with _open_binary(path) as f:
        while skip > 0 and (got := len(f.read(min(skip, _CHUNK_BYTES)))):
            skip -= got
        sample = f.read(1 << 20)
    if _looks_western(sample):
        return "cp1252"
    best = from_bytes(sample).best()
    return None if best is None else best.encoding


# Letters and signs of Western European text beyond ASCII, as cp1252 (a superset of the printable
# Latin-1) decodes them.
_WESTERN = frozenset(
    "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿŒœŠšŽžŸ"
    "\u2018\u2019\u201c\u201d\u2013\u2014\u2026«»°€£§©®·¿¡\xa0"
)


def _looks_western(sample: bytes) -> bool:
    """Whether ``sample`` reads as Western European text in cp1252: it decodes, nearly all its
    non-ASCII characters are Latin letters and signs (:data:`_WESTERN`), and they are a minority
    of its letters (Cyrillic in cp1251, read as cp1252, is all accented letters)."""
    try:
        text = sample.decode("cp1252")
    except UnicodeDecodeError:
        return False
    high = [c for c in text if ord(c) > 127]
    letters = sum(c.isalpha() for c in text)
    accented = sum(c.isalpha() for c in high)
    return (
        bool(high)
        and sum(c in _WESTERN for c in high) >= 0.9 * len(high)
        and (accented <= 0.3 * letters)
    )


# Python codec names whose iconv name is not the upper-cased one.
_ICONV_NAMES = {"latin_1": "LATIN1", "iso8859-1": "LATIN1", "mac-roman": "MACINTOSH"}


def iconv_name(encoding: str) -> str:
    """The name ``iconv`` knows a Python codec by (``cp1252`` -> ``CP1252``, ``latin_1`` ->
    ``LATIN1``)."""
    canonical = codecs.lookup(encoding).name
    return _ICONV_NAMES.get(
        encoding, _ICONV_NAMES.get(canonical, canonical.upper().replace("_", "-"))
    )


@dataclass(frozen=True)
class NotUtf8:
    """A file that is not UTF-8: its first bad byte (``line`` from 1, byte ``offset`` from 0, in
    the decompressed file) and the encoding it most likely is in (None: no text encoding fits)."""

    path: Path
    line: int
    offset: int
    encoding: str | None


def find_not_utf8(path: Path) -> NotUtf8 | None:
    """Where ``path`` is not UTF-8 and what it likely is (:func:`guess_encoding`); None when the
    whole file is UTF-8."""
    found = first_invalid_utf8(path)
    if found is None:
        return None
    line, offset = found
    return NotUtf8(path, line, offset, guess_encoding(path, offset))


def describe_not_utf8(found: Iterable[NotUtf8]) -> list[str]:
    """One sentence per likely encoding on files that are not UTF-8: which files, where, and the
    ``iconv`` command that converts them in place."""
    groups: dict[str | None, list[NotUtf8]] = {}
    for f in found:
        groups.setdefault(f.encoding, []).append(f)
    out = []
    for encoding, files in groups.items():
        one = len(files) == 1
        where = ", ".join(f"{f.path} (line {f.line}, byte {f.offset})" for f in files)
        where += " is not UTF-8" if one else " are not UTF-8"
        if encoding is None:
            them = "it" if one else "them"
            out.append(f"{where} and no text encoding fits {them}: remove {them} if not text")
            continue
        name = iconv_name(encoding)
        if not one:
            how = f"`iconv -f {name} -t UTF-8 FILE > FILE.utf8 && mv FILE.utf8 FILE`"
            out.append(f"{where} and look like {encoding}; convert each in place with {how}")
        elif infer_compression(files[0].path):
            out.append(
                f"{where} and looks like {encoding}; decompress it and convert it with "
                f"`iconv -f {name} -t UTF-8`"
            )
        else:
            src, tmp = shlex.quote(str(files[0].path)), shlex.quote(f"{files[0].path}.utf8")
            how = f"`iconv -f {name} -t UTF-8 {src} > {tmp} && mv {tmp} {src}`"
            out.append(f"{where} and looks like {encoding}; convert it in place with {how}")
    return out


def skip_details(
    sources: Iterable[SourceConfig],
    skipped: Mapping[str, int],
    *,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Where the skipped documents of ``sources`` come from, one sentence each, for messages:
    for ``invalid_utf8``, the first :data:`DETAIL_LIMIT` text or json files that are not UTF-8
    with their likely encoding (:func:`describe_not_utf8`) and the parquet or saved sources with
    such strings; for ``malformed_json``, the first such files with their first malformed line
    numbers; for ``missing_field``, the text field looked for. Reads the sources again
    (``cache_dir`` as :func:`load_source`): call it only when there are such skips.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_source`.
    """
    sources = list(sources)
    out: list[str] = []
    if skipped.get("invalid_utf8"):
        not_utf8: list[NotUtf8] = []
        for src in sources:
            fmt, files = source_files(src)
            if fmt in ("parquet", "saved"):
                texts = load_source(src, cache_dir=cache_dir)["text"]
                if n := sum(classify(t) == "invalid_utf8" for t in texts):
                    out.append(f"source {src.path!r} ({fmt}) holds {n} strings that are not UTF-8")
                continue
            for f in files:
                if len(not_utf8) < DETAIL_LIMIT and (bad := find_not_utf8(f)) is not None:
                    not_utf8.append(bad)
        out += describe_not_utf8(not_utf8)
        if len(not_utf8) == DETAIL_LIMIT:
            out.append(f"Only the first {DETAIL_LIMIT} files that are not UTF-8 are named")
    if skipped.get("malformed_json"):
        found = 0
        for src in sources:
            fmt, files = source_files(src)
            for f in files if fmt == "json" else []:
                if found < DETAIL_LIMIT and (bad := malformed_json_lines(f)):
                    lines = "line" if len(bad) == 1 else "lines"
                    out.append(f"{f} has {len(bad)} malformed json {lines} ({lines} {_some(bad)})")
                    found += 1
    if skipped.get("missing_field"):
        fields = sorted({s.text_field for s in sources if source_files(s)[0] != "text"})
        out.append(f"records without the text field {', '.join(map(repr, fields))} are skipped")
    return out
