"""Export of Kiln's sentencepiece tokenizer as a Hugging Face tokenizer, and a check that the
export encodes exactly like Kiln.

``save_hf_tokenizer`` writes ``tokenizer.model`` (the sentencepiece model, unchanged),
``tokenizer.json`` (a ``tokenizers`` pipeline), ``tokenizer_config.json`` and
``special_tokens_map.json``. ``AutoTokenizer.from_pretrained(folder)`` then loads a
``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) that runs ``tokenizer.json``
as written.

Why not transformers' own Llama and T5 tokenizers: ``LlamaConverter`` prepends ``▁`` (Llama's
dummy prefix) and ``T5Converter`` splits on whitespace and folds space runs, and in transformers 5
the ``LlamaTokenizer`` and ``T5Tokenizer`` classes rebuild that pipeline from the vocabulary
whatever ``tokenizer.json`` says. Kiln's tokenizer has identity normalization, no dummy prefix and
no whitespace folding, so the pipeline here is the one transformers itself builds for a plain
sentencepiece model (``SpmConverter.build_tokenizer_from_spm_proto`` in
``transformers/convert_slow_tokenizer.py``): spaces become ``▁``, no pre-tokenizer, a BPE model
with sentencepiece's merges (or a Unigram model with its scores) and byte fallback, and a decoder
that turns ``▁`` back into spaces and ``<0xNN>`` pieces back into bytes. ``tokenizer_class`` is
``PreTrainedTokenizerFast``, a name transformers 4 and 5 both resolve to that pass-through class.

Special tokens: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3 (Kiln's fixed ids), T5 sentinels
``<extra_id_i>`` at ``vocab_size - 1 - i`` as additional (extra) special tokens. Default
special-token behaviour follows Kiln's training data: ``"llama"`` adds neither BOS nor EOS
(documents are packed with only an EOS after each, see ``trainer/data/prepare.py``); ``"t5"``
appends ``</s>`` as ``T5Tokenizer`` does (span-corruption inputs end with EOS).

The T5 EOS comes from ``tokenizer.json``'s post-processor template: transformers 5 takes the
template as written and does not read ``add_eos_token`` back from ``tokenizer_config.json`` (so a
loaded T5 tokenizer appends EOS while its ``add_eos_token`` attribute reads ``False``).

Known differences from Kiln's ``Tokenizer.encode``, all reported by
:func:`tokenizer_mismatches` on texts that show them:

- The literal text ``<s>``, ``</s>``, ``<unk>`` or ``<pad>`` encodes to that one special id (as in
  every Hugging Face Llama or T5 tokenizer); sentencepiece spells it out in ordinary pieces.
- Unigram models only: sentencepiece sums piece scores in float32, ``tokenizers`` in float64, so
  where two segmentations score within rounding of each other (seen once, on a run of 20 spaces
  in a 7 KB code file) they may pick different ones; and the literal text of a byte piece, such as
  ``<0x41>``, encodes to that byte piece, since ``tokenizers``' Unigram matches every vocabulary
  entry. BPE matched exactly on every text tried.
- A tokenizer trained without byte fallback: sentencepiece decodes ``<unk>`` as `` ⁇ ``, Hugging
  Face as ``<unk>`` (or nothing, skipping special tokens).

Transformers 5 has no sentencepiece-backed ("slow") class behind ``AutoTokenizer``: it ignores
``use_fast=False`` and always returns the ``tokenizers``-backed class (transformers 4 does the
same for ``tokenizer_class: PreTrainedTokenizerFast``). The sentencepiece-backed class it still
ships, ``SentencePieceBackend``, loads the folder's ``tokenizer.model`` and encodes exactly like
Kiln, but its generic decode joins piece strings (``<0xNN>`` stays literal, the ends are
stripped), so only its encoding is checked.

This module must not import ``trainer``, ``deepspeed``, ``torch.distributed`` or ``ray``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sentencepiece import sentencepiece_model_pb2

from model.registry import family
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

if TYPE_CHECKING:
    import tokenizers

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # sentencepiece's ModelProto.SentencePiece.Type
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_fast_tokenizer(tok: Tokenizer, *, model_type: str) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` that encodes like ``tok`` (see the module docstring).

    Raises:
        ValueError: ``model_type`` is no model family; the sentencepiece model is
            neither BPE nor unigram, does not have Kiln's special ids, or normalizes text
            (a foreign model).
    """
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.models import BPE, Unigram

    appends_eos = family(model_type).tokenizer_appends_eos
    proto = _proto(tok)
    pieces = list(proto.pieces)
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        merges = _bpe_merges(pieces)
        model = BPE(
            {p.piece: i for i, p in enumerate(pieces)},
            merges,
            unk_token=pieces[UNK_ID].piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
        )
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        # Scores as they are: the unknown-piece penalty of both is the lowest score minus 10.
        vocab = [(p.piece, p.score) for p in pieces]
        model = Unigram(vocab, unk_id=UNK_ID, byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        raise ValueError(
            f"{tok}: sentencepiece model type {proto.trainer_spec.model_type} is neither BPE nor "
            f"unigram; only those export to Hugging Face"
        )
    fast = FastTokenizer(model)
    fast.normalizer = normalizers.Replace(" ", "\u2581")
    fast.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control pieces are special tokens; sentinels (user-defined pieces) are matched in the text
    # before the model runs, as sentencepiece does, and are special tokens too (T5's convention).
    fast.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=True)
            for p in pieces
            if p.type in (_CONTROL, _USER_DEFINED) or p.piece == pieces[UNK_ID].piece
        ]
    )
    if appends_eos:
        eos = pieces[EOS_ID].piece
        fast.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0",
            pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
            special_tokens=[(eos, EOS_ID)],
        )
    return fast


def save_hf_tokenizer(
    tok: Tokenizer, out_dir: Path, *, model_type: str, model_max_length: int
) -> list[str]:
    """Write ``tok`` into ``out_dir`` so that ``transformers.AutoTokenizer`` loads it offline.

    The caller writes the model's ``config.json`` (its ``vocab_size`` is the embedding's row
    count, which may exceed ``tok.vocab_size`` when padded; ids beyond ``tok.vocab_size`` decode to
    nothing in Hugging Face) and should run :func:`tokenizer_mismatches` on the folder.

    Args:
        tok: Kiln's tokenizer (special ids unk 0, bos 1, eos 2, pad 3).
        out_dir: the folder (created if missing); existing files of the same names are replaced.
        model_type: a model family; its spec's ``tokenizer_appends_eos`` says whether encode
            appends EOS (T5) or adds no special token (Llama).
        model_max_length: the longest input the model takes, in tokens (``data.seq_len``).

    Returns:
        The file names written: ``tokenizer.model``, ``tokenizer.json``,
        ``tokenizer_config.json``, ``special_tokens_map.json``.

    Raises:
        ValueError: as :func:`build_fast_tokenizer`; ``model_max_length`` < 1.
    """
    if model_max_length < 1:
        raise ValueError(f"model_max_length={model_max_length} must be a positive token count")
    fast = build_fast_tokenizer(tok, model_type=model_type)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(tok.model_proto)  # the bytes Kiln loads
    fast.save(str(out_dir / "tokenizer.json"))
    specials = _special_tokens(tok)
    added = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(fast.get_added_tokens_decoder().items())
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": family(model_type).tokenizer_appends_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "added_tokens_decoder": added,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", specials)
    return list(FILES)


def _special_tokens(tok: Tokenizer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bos_token": tok.id_to_piece(BOS_ID),
        "eos_token": tok.id_to_piece(EOS_ID),
        "unk_token": tok.id_to_piece(UNK_ID),
        "pad_token": tok.id_to_piece(PAD_ID),
    }
    sentinels = [tok.id_to_piece(i) for i in tok.sentinel_ids]
    if sentinels:
        out["additional_special_tokens"] = sentinels
    return out


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges in sentencepiece's order: a pair may merge when the joined piece is an ordinary
    piece, and the higher that piece's score, the earlier. Every split of a piece into two
    ordinary pieces is listed, as ``generate_merges`` in transformers does."""
    normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    merges = []
    for piece, rank in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((rank, normal[left][1], normal[right][1], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _proto(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    norm = proto.normalizer_spec
    specials = [tok.id_to_piece(i) for i in (UNK_ID, BOS_ID, EOS_ID, PAD_ID)]
    if (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) != (UNK_ID, BOS_ID, EOS_ID, PAD_ID):
        raise ValueError(
            f"{tok} has special ids unk {tok.unk_id}, bos {tok.bos_id}, eos {tok.eos_id}, pad "
            f"{tok.pad_id} ({specials}); Kiln's export needs 0, 1, 2, 3: train it with Kiln"
        )
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        raise ValueError(
            f"{tok} normalizes text (add_dummy_prefix={norm.add_dummy_prefix}, "
            f"remove_extra_whitespaces={norm.remove_extra_whitespaces}, rule "
            f"{norm.name!r}); Kiln's export handles only identity normalization: train it with "
            f"Kiln"
        )
    return proto


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_mismatches(
    folder: Path, tok: Tokenizer, texts: Sequence[str], *, model_type: str
) -> list[str]:
    """Every way the Hugging Face tokenizer in ``folder`` differs from Kiln's ``tok`` on ``texts``.

    Loads ``folder`` with ``AutoTokenizer.from_pretrained`` (the fast, ``tokenizers``-backed
    class; transformers 5 has no other behind ``AutoTokenizer``) and checks:

    - the special tokens: unk, bos, eos, pad have Kiln's pieces and ids, every sentinel
      ``<extra_id_i>`` is one special token with Kiln's id, and the vocabulary has
      ``tok.vocab_size`` entries;
    - for each text: ``encode(text, add_special_tokens=False)`` equals ``tok.encode(text)``; plain
      ``encode(text)`` adds nothing (``"llama"``) or appends EOS (``"t5"``);
      ``decode(ids, skip_special_tokens=True)`` equals Kiln's decode of the ids without
      sentinels, and ``decode(ids)`` Kiln's decode of all of them.

    Where transformers offers ``SentencePieceBackend`` (the sentencepiece-backed class), it loads
    ``folder`` with it too and checks its token ids; not its decode, which joins pieces as text
    (``<0xNN>`` stays literal, the ends are stripped) whatever the model.

    Args:
        folder: a folder written by :func:`save_hf_tokenizer` (with or without a model's
            ``config.json`` beside it).
        tok: Kiln's tokenizer it should match.
        texts: texts to compare on (a few documents of each language and of code).
        model_type: the model family, as given to :func:`save_hf_tokenizer`.

    Returns:
        One human-readable line per mismatch; empty when the export matches on all of ``texts``.

    Raises:
        ValueError: ``model_type`` is no model family.
    """
    appends_eos = family(model_type).tokenizer_appends_eos
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        fast = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a load failure is the first mismatch, not a crash of the check
        return [f"AutoTokenizer.from_pretrained({folder}) failed: {type(e).__name__}: {e}"]
    name = f"AutoTokenizer ({type(fast).__name__})"
    out = _special_token_mismatches(name, fast, tok)
    sentinels = {int(i) for i in tok.sentinel_ids}
    for text in texts:
        ids = tok.encode(text)
        got = fast.encode(text, add_special_tokens=False)
        if got != ids:
            out.append(_ids_mismatch(name, "encode(add_special_tokens=False)", text, got, ids, tok))
        want = [*ids, tok.eos_id] if appends_eos else ids
        got = fast.encode(text)
        if got != want:
            what = "encode() with default special tokens"
            out.append(_ids_mismatch(name, what, text, got, want, tok))
        want_text = tok.decode([i for i in ids if i not in sentinels])
        got_text = fast.decode(ids, skip_special_tokens=True)
        if got_text != want_text:
            out.append(
                f"{name}: decode(skip_special_tokens=True) of {_show(text)} gives "
                f"{_show(got_text)}, Kiln {_show(want_text)}"
            )
        want_text = tok.decode(ids)
        got_text = fast.decode(ids)
        if got_text != want_text:
            out.append(
                f"{name}: decode() of {_show(text)} gives {_show(got_text)}, Kiln "
                f"{_show(want_text)}"
            )
    out += _sentencepiece_backend_mismatches(folder, tok, texts)
    return out


def _special_token_mismatches(name: str, hf: Any, tok: Tokenizer) -> list[str]:
    out = []
    if not hf.is_fast:
        out.append(f"{name} is not a fast (tokenizers) tokenizer")
    for role, want_id in (("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID), ("pad", PAD_ID)):
        token, token_id = getattr(hf, f"{role}_token"), getattr(hf, f"{role}_token_id")
        want = tok.id_to_piece(want_id)
        if (token, token_id) != (want, want_id):
            out.append(
                f"{name}: {role}_token is {token!r} id {token_id}, Kiln {want!r} id {want_id}"
            )
    if len(hf) != tok.vocab_size:
        out.append(f"{name}: {len(hf)} tokens, Kiln {tok.vocab_size}")
    special = set(hf.all_special_tokens)
    for want_id in tok.sentinel_ids:
        piece = tok.id_to_piece(want_id)
        got = hf.convert_tokens_to_ids(piece)
        if got != want_id or piece not in special:
            out.append(
                f"{name}: sentinel {piece!r} has id {got} (Kiln {want_id})"
                f"{'' if piece in special else ' and is not a special token'}"
            )
    return out


def _sentencepiece_backend_mismatches(
    folder: Path, tok: Tokenizer, texts: Sequence[str]
) -> list[str]:
    try:
        from transformers import SentencePieceBackend
    except ImportError:  # transformers 4 names it differently: nothing to check there
        return []
    try:
        slow = SentencePieceBackend.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        return [f"SentencePieceBackend.from_pretrained({folder}) failed: {type(e).__name__}: {e}"]
    name = "SentencePieceBackend"
    out = []
    for text in texts:
        ids = tok.encode(text)
        got = slow.encode(text, add_special_tokens=False)
        if got != ids:
            out.append(_ids_mismatch(name, "encode(add_special_tokens=False)", text, got, ids, tok))
    return out


def _ids_mismatch(
    name: str, what: str, text: str, got: list[int], want: list[int], tok: Tokenizer
) -> str:
    at = next(
        (k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )

    def pieces(ids: list[int]) -> list[str]:
        return [tok.id_to_piece(i) for i in ids[max(0, at - 2) : at + 3]]

    msg = (
        f"{name}: {what} of {_show(text)} gives {len(got)} ids, Kiln {len(want)}; first "
        f"difference at position {at}: {pieces(got)} vs Kiln {pieces(want)}"
    )
    literal = [tok.id_to_piece(i) for i in (UNK_ID, BOS_ID, EOS_ID, PAD_ID)]
    if any(p in text for p in literal):
        msg += (
            f" (the text holds one of {literal} literally: Hugging Face reads it as that special "
            f"token, sentencepiece as ordinary text)"
        )
    return msg


def _show(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
