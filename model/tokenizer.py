"""The sentencepiece tokenizer of Kiln: training from a text stream, and a thin wrapper to use it.

Special ids are fixed and Llama-compatible for the first three: ``<unk>`` = 0, ``<s>`` (BOS) = 1,
``</s>`` (EOS) = 2, and ``<pad>`` = 3.

Training settings and why:

- ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: the text is not changed (no NFKC, no whitespace folding, no space
  added in front), so ``decode(encode(x)) == x`` exactly and the UTF-8 bytes of the pieces of
  ``encode(x)`` add up to ``len(x.encode())`` (what bits-per-byte needs). The one exception is
  the character ``▁`` (U+2581) itself, which sentencepiece reads as a space.
- ``byte_fallback=True``: characters outside the vocabulary (rare Hangul syllables, emoji, CJK)
  become ``<0xNN>`` byte pieces instead of ``<unk>``; with it a trained vocabulary holds at least
  4 special + 256 byte pieces.
- ``split_digits=True``: numbers are spelled digit by digit (Llama, PaLM).
- ``allow_whitespace_only_pieces=True``: runs of spaces (code indentation) get their own pieces.
- Sentinels (``num_sentinels`` N > 0, for span corruption): ``<extra_id_0>`` ...
  ``<extra_id_{N-1}>`` are user-defined pieces (the text ``<extra_id_3>`` encodes to that one
  id) placed at the end of the vocabulary in T5's order, ``<extra_id_i>`` = ``vocab_size - 1 -
  i``, so the model exports as a T5 tokenizer. They count in ``vocab_size``.
- ``hard_vocab_limit=True`` (sentencepiece's default, kept on purpose): the tokenizer has exactly
  ``vocab_size`` pieces, so the config, the metadata and the model's embedding agree. A corpus
  too small for the requested size is a :class:`ValueError` that says which size fits.

This module must not import ``trainer``, ``deepspeed``, ``torch.distributed`` or ``ray``.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 3
META_FILE = "tokenizer_meta.json"
META_FORMAT_VERSION = 1
# A sampled line longer than this many characters is cut: sentencepiece drops sentences over
# max_sentence_length bytes, and a UTF-8 character is at most 4 bytes.
MAX_SENTENCE_CHARS = 1 << 16
_MAX_SENTENCE_BYTES = 4 * MAX_SENTENCE_CHARS
_MIN_VOCAB_BYTE_FALLBACK = 4 + 256  # special pieces + one piece per byte value
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def sentinel_piece(i: int) -> str:
    """The piece of sentinel ``i`` (T5's name): ``<extra_id_{i}>``."""
    return f"<extra_id_{i}>"


class Tokenizer:
    """A trained sentencepiece model with Kiln's fixed special ids.

    Create with :meth:`load` (or :func:`train_tokenizer`). Instances pickle by value (the model
    bytes), so they can be handed to worker processes.
    """

    def __init__(self, model_proto: bytes, path: Path | None = None) -> None:
        self.model_proto = model_proto  # the serialized sentencepiece model (tokenizer.model)
        self.path = path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.model`` file.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer {path} does not exist; train it with `kiln tokenizer train CONFIG` "
                f"(or `kiln data prepare CONFIG`, which trains it first) or set tokenizer.path"
            )
        return cls(path.read_bytes(), path)

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self.model_proto, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["path"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids run from 0 to vocab_size - 1)."""
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The padding id; -1 for a foreign tokenizer that defines none (Llama's own)."""
        return self._sp.pad_id()

    @property
    def sentinel_ids(self) -> np.ndarray:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in sentinel order: ``(N,) int64``;
        empty when the tokenizer has no sentinels (or they do not run 0..N-1 without a gap)."""
        found: dict[int, int] = {}
        for i in range(self.vocab_size):
            if self._sp.is_unknown(i) or self._sp.is_control(i) or self._sp.is_byte(i):
                continue
            m = _SENTINEL.fullmatch(self._sp.id_to_piece(i))
            if m:
                found[int(m.group(1))] = i
        n = 0
        while n in found:
            n += 1
        return np.array([found[k] for k in range(n)], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS or EOS (sentencepiece threads over the batch)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids`` (a list or a 1-d integer array); control ids (BOS, EOS, pad) decode to
        nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of the text each id stands for: ``(vocab_size,) int32``.

        ``▁`` counts as one space byte, a byte-fallback piece ``<0xNN>`` as 1, control, unknown
        and sentinel pieces as 0 (a sentinel stands for a span, not for text).
        ``token_bytes()[ids].sum() == len(text.encode())`` for ``ids =
        encode(text)`` of any text without ``<unk>``; the denominator of bits-per-byte.
        """
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):
                out[i] = 1
            elif _SENTINEL.fullmatch(self._sp.id_to_piece(i)):
                continue
            else:
                out[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def line_key(seed: int, doc: int, line: int) -> int:
    """The sampling key of line ``line`` of document ``doc`` (0-based, non-blank lines only):
    a 64-bit hash (BLAKE2b) of ``(seed, doc, line)``, uniform and independent of the rest."""
    h = hashlib.blake2b(f"{seed}/{doc}/{line}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def keyed_line_sample(
    texts: Iterable[str], k: int, seed: int = 0, first_doc: int = 0
) -> tuple[list[tuple[int, str]], int]:
    """The ``k`` non-blank lines of ``texts`` with the smallest :func:`line_key`, in one pass.

    A bottom-k sample (Cohen & Kaplan 2007, "Summarizing data using bottom-k sketches"): uniform
    without replacement, memory ``k`` lines, and mergeable, since the bottom k of a union is the
    bottom k of the parts' bottom k. So parts of a corpus sampled anywhere (Ray tasks) and merged
    with :func:`merge_line_samples` give exactly the sample of the whole. Document ``i`` of
    ``texts`` is document ``first_doc + i`` of the corpus. Lines over
    :data:`MAX_SENTENCE_CHARS` characters are cut to that length.

    Returns:
        ((key, line) pairs sorted by key, the number of non-blank lines seen).

    Raises:
        ValueError: ``k`` < 1.
    """
    if k <= 0:
        raise ValueError(f"input_sentence_size must be positive, got {k}")
    heap: list[tuple[int, str]] = []  # max-heap of the k smallest keys, as negated keys
    seen = 0
    for doc, text in enumerate(texts, start=first_doc):
        line_no = 0
        for line in text.split("\n"):
            if not line.strip():
                continue
            key = line_key(seed, doc, line_no)
            line_no += 1
            seen += 1
            if len(heap) < k:
                heapq.heappush(heap, (-key, line[:MAX_SENTENCE_CHARS]))
            elif key < -heap[0][0]:
                heapq.heapreplace(heap, (-key, line[:MAX_SENTENCE_CHARS]))
    return sorted((-neg, line) for neg, line in heap), seen


def merge_line_samples(
    parts: Iterable[tuple[list[tuple[int, str]], int]], k: int
) -> tuple[list[str], int]:
    """Merge :func:`keyed_line_sample` results of disjoint parts of a corpus into the sample of
    the whole: (the ``k`` lines with the smallest keys, in key order; lines seen in all).
    Memory: ``k`` lines plus one part at a time."""
    heap: list[tuple[int, str]] = []  # the k smallest so far, keys negated (a max-heap)
    seen = 0
    for part, n in parts:
        seen += n
        for key, line in part:
            if len(heap) < k:
                heapq.heappush(heap, (-key, line))
            elif key < -heap[0][0]:
                heapq.heapreplace(heap, (-key, line))
    return [line for _, line in sorted(heap, key=lambda x: -x[0])], seen


def sample_lines(texts: Iterable[str], k: int, seed: int = 0) -> tuple[list[str], int]:
    """Uniform sample of at most ``k`` non-blank lines of ``texts`` (documents), in one pass:
    :func:`keyed_line_sample` of the whole stream.

    Returns:
        (the sampled lines in key order, the number of non-blank lines seen).
    """
    return merge_line_samples([keyed_line_sample(texts, k, seed)], k)


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    *,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
    input_sentence_size: int = 1_000_000,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    num_sentinels: int = 0,
    seed: int = 0,
) -> Tokenizer:
    """Train a sentencepiece tokenizer on a sample of the lines of ``texts``.

    ``texts`` is streamed once; a seeded bottom-k sample (:func:`sample_lines`) keeps at most
    ``input_sentence_size`` lines (sentences), so the corpus may be larger than memory. Writes
    ``out_path`` (the ``tokenizer.model``) atomically and ``tokenizer_meta.json`` beside it
    (model type, vocab size, special ids, sha256 of the model file, sentences seen and sampled).

    Args:
        texts: documents (any number of lines each).
        out_path: where ``tokenizer.model`` goes; parent folders are created.
        vocab_size: exact number of pieces (4 special + 256 bytes + learned, with byte_fallback).
        model_type: ``"bpe"`` or ``"unigram"``.
        input_sentence_size: most lines sampled for training.
        character_coverage: share of characters that get their own piece, in [0.98, 1]; the rest
            fall back to bytes (0.9995 for English; 0.98-0.9995 for Korean/CJK, lower for a
            small vocab).
        byte_fallback: unknown characters become ``<0xNN>`` pieces instead of ``<unk>``.
        num_sentinels: T5 sentinel pieces reserved at the end of the vocabulary (0: none).
        seed: seed of the line sample.

    Raises:
        ValueError: no usable text; ``character_coverage`` outside [0.98, 1] (sentencepiece's
            range); or ``vocab_size`` does not fit the sample (too small for the
            characters and bytes it must hold, or larger than the text can fill); the message
            says what to change.
    """
    _check_training_args(vocab_size, model_type, character_coverage, byte_fallback, num_sentinels)
    sample, seen = sample_lines(texts, input_sentence_size, seed)
    return train_tokenizer_on_sample(
        sample,
        seen,
        out_path,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        num_sentinels=num_sentinels,
        seed=seed,
    )


def train_tokenizer_on_sample(
    sample: Sequence[str],
    seen: int,
    out_path: str | Path,
    *,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    num_sentinels: int = 0,
    seed: int = 0,
) -> Tokenizer:
    """:func:`train_tokenizer` on lines already sampled (e.g. by Ray tasks with
    :func:`keyed_line_sample` and :func:`merge_line_samples`); ``seen`` is the number of lines
    the sample was drawn from (recorded in the metadata).

    Raises:
        ValueError: as :func:`train_tokenizer`.
    """
    out_path = Path(out_path)
    _check_training_args(vocab_size, model_type, character_coverage, byte_fallback, num_sentinels)
    if not sample:
        raise ValueError(
            "no non-blank line of text to train the tokenizer on; check the data sources"
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            max_sentence_length=_MAX_SENTENCE_BYTES,
            hard_vocab_limit=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            user_defined_symbols=[sentinel_piece(i) for i in range(num_sentinels)],
            num_threads=min(16, len(os.sched_getaffinity(0))),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _explain_trainer_error(e, vocab_size, character_coverage, len(sample)) from None
    proto = _sentinels_last(model.getvalue()) if num_sentinels else model.getvalue()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path, proto)
    tok = Tokenizer(proto, out_path)
    write_meta(
        tok,
        out_path.parent,
        character_coverage=character_coverage,  # as given (the model file holds a float32)
        seed=seed,
        sentences_seen=seen,
        sentences_sampled=len(sample),
    )
    return tok


def write_meta(tok: Tokenizer, folder: Path, **extra: Any) -> dict[str, Any]:
    """Write ``tokenizer_meta.json`` for ``tok`` into ``folder`` (atomically) and return it: what
    the model file says (algorithm, ``vocab_size``, special ids, sha256, character coverage, byte
    fallback, sentinels), then ``extra`` (how it was trained, where it was copied from)."""
    spec = sentencepiece_model_pb2.ModelProto.FromString(tok.model_proto).trainer_spec
    meta = {
        "format_version": META_FORMAT_VERSION,
        "model_type": spec.ModelType.Name(spec.model_type).lower(),
        "vocab_size": tok.vocab_size,
        "special_ids": {"unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id},
        "sha256": tok.sha256,
        "character_coverage": spec.character_coverage,
        "byte_fallback": spec.byte_fallback,
        "num_sentinels": len(tok.sentinel_ids),
        **extra,
    }
    _atomic_write(Path(folder) / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _check_training_args(
    vocab_size: int, model_type: str, character_coverage: float, byte_fallback: bool,
    num_sentinels: int,
) -> None:  # fmt: skip
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer.model_type={model_type!r}; use 'bpe' or 'unigram'")
    if not 0.98 <= character_coverage <= 1.0:
        raise ValueError(
            f"tokenizer.character_coverage={character_coverage} is outside [0.98, 1], the range "
            f"sentencepiece accepts; use 0.9995 (English) or 0.98-0.9995 (Korean, Chinese, "
            f"Japanese: rarer characters then fall back to bytes)"
        )
    if num_sentinels < 0:
        raise ValueError(f"tokenizer.num_sentinels={num_sentinels} must be >= 0")
    reserved = (_MIN_VOCAB_BYTE_FALLBACK if byte_fallback else 4) + num_sentinels
    if vocab_size <= reserved:
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} leaves no room for learned pieces: 4 special"
            f"{' + 256 byte' if byte_fallback else ''} + {num_sentinels} sentinel pieces are "
            f"reserved; raise tokenizer.vocab_size above {reserved} (a few thousand or more "
            f"for real use)"
        )


def _sentinels_last(proto: bytes) -> bytes:
    """Move the sentinel pieces (sentencepiece puts user-defined pieces right after the special
    ones) to the end of the vocabulary in T5's order: ``<extra_id_0>`` last. Encoding does not
    change (pieces are matched by text and score, not id); the special ids stay 0-3."""
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    pieces = list(m.pieces)
    sentinels = [p for p in pieces if _SENTINEL.fullmatch(p.piece)]
    sentinels.sort(key=lambda p: -int(_SENTINEL.fullmatch(p.piece).group(1)))
    del m.pieces[:]
    m.pieces.extend([p for p in pieces if not _SENTINEL.fullmatch(p.piece)] + sentinels)
    return m.SerializeToString()


def _explain_trainer_error(
    e: RuntimeError, vocab_size: int, coverage: float, n_sentences: int
) -> Exception:
    msg = str(e)
    if "Vocabulary size too high" in msg:
        fits = re.search(r"<= (\d+)", msg)
        limit = f" to at most {fits.group(1)}" if fits else ""
        return ValueError(
            f"tokenizer.vocab_size={vocab_size} is more than the {n_sentences} sampled lines "
            f"can fill (too few distinct characters and words): lower tokenizer.vocab_size"
            f"{limit} or train on more text"
        )
    if "smaller than required_chars" in msg:
        need = re.search(r"\d+ vs (\d+)", msg)
        size = f" need at least {need.group(1)} pieces" if need else " do not fit"
        return ValueError(
            f"tokenizer.vocab_size={vocab_size} is too small: the characters that "
            f"tokenizer.character_coverage={coverage} keeps, plus the special and byte pieces,"
            f"{size}; raise tokenizer.vocab_size or lower tokenizer.character_coverage (down "
            f"to 0.98; rarer characters then fall back to bytes)"
        )
    return RuntimeError(f"sentencepiece training failed: {msg}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
