"""Training objectives: how packed token rows become model inputs and labels.

- ``causal_lm`` (decoder): inputs ``row[:-1]``, labels ``row[1:]``.
- ``span_corruption`` (encoder-decoder; Raffel et al. 2020, Sec. 3.1.4 and 3.3.4): noise spans of
  the raw tokens are replaced by one sentinel each in the inputs; the targets list each sentinel
  followed by the tokens it hides. Span layout as T5's `random_spans_noise_mask`, lengths as its
  `random_spans_helper` (google-research/text-to-text-transfer-transformer,
  `t5/data/preprocessors.py`), so inputs and targets have fixed lengths and no padding.
- ``prefix_lm`` (encoder-decoder): the row is split at a point drawn per sequence; the encoder
  reads the prefix and the decoder predicts the rest (T5 Sec. 3.2.3, UL2's S-denoiser).

Several encoder-decoder objectives with weights form a UL2-style mixture (Tay et al. 2022): each
sequence draws its objective. Every draw comes from ``numpy.random.default_rng((seed, split,
index))`` of the sample's global index, so a batch is a pure function of (seed, index) and a
resume replays it exactly, on any number of ranks.

Document masking (``data.document_mask``): a packed row holds several documents, each ending at
(and including) an EOS. The batch then also carries each position's document id (the count of
EOS before it in the row, :func:`document_ids`), derived here from the tokens, so prepared shards
need nothing new; the model turns the ids into its attention masks. For the decoder the ids are
the input tokens'; ``data.reset_position_ids`` adds ``position_ids`` that restart at 0 with each
document (Megatron-LM's option). For span corruption every encoder token keeps its raw token's
document (a sentinel: the first token of its span's), every target token belongs to the
document of the span it restores, and the appended EOS to the last span's; the decoder inputs
restart behind ``decoder_start_id`` at each document's first target, so each document's targets
are decoded as if alone. Prefix LM follows the same rule: its targets are one span, the row's
suffix, so they belong to the document the split falls in (and so does the encoder's EOS).
Padding has document -1.

Tensors are int64; B sequences, R raw tokens (``data.seq_len``), I encoder length, L decoder
length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from trainer.config import DataConfig, KilnConfig, ObjectiveConfig

IGNORE_INDEX = -100
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


class Batch(NamedTuple):
    """One micro-batch: ``inputs`` are the model's keyword arguments ((B, ...) int64 tensors),
    ``labels`` (B, T) int64 align with the logits (``-100``: no loss), ``sample_ids`` (B,) int64
    name the packed rows (see `trainer.data.dataset`)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    sample_ids: np.ndarray


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of the labelled positions, in fp32: next tokens of a decoder, targets of an
    encoder-decoder.

    Args:
        logits: (B, T, V) any float dtype.
        labels: (B, T) int64 aligned with the logits; ``-100`` marks positions that do not count.
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )  # fmt: skip


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Each position's document in packed rows: the number of EOS before it (a document ends at
    and includes its EOS; the next token starts the next). tokens: (..., R) ints -> (..., R)
    int64, 0 for the row's first document."""
    eos = tokens == eos_id
    return (np.cumsum(eos, axis=-1) - eos).astype(np.int64)


def document_positions(documents: np.ndarray) -> np.ndarray:
    """Each position's offset in its own document (what ``data.reset_position_ids`` gives RoPE,
    as Megatron-LM's ``get_ltor_masks_and_position_ids``): documents (B, R) int64 ids, equal
    along each document -> (B, R) int64, 0 at each document's first position."""
    index = np.broadcast_to(np.arange(documents.shape[-1]), documents.shape)
    first = np.ones(documents.shape, dtype=bool)
    first[..., 1:] = documents[..., 1:] != documents[..., :-1]
    return index - np.maximum.accumulate(np.where(first, index, 0), axis=-1)


class CausalLM:
    """Next-token prediction over packed rows of R + 1 tokens.

    Args:
        document_mask: add ``document_ids`` (B, R) to the inputs (:func:`document_ids` of the
            input tokens).
        reset_position_ids: add ``position_ids`` (B, R), restarting per document
            (:func:`document_positions`); needs ``document_mask``.
        eos_id: the tokenizer's EOS, which ends each document (needed with ``document_mask``).

    Raises:
        ValueError: ``document_mask`` without ``eos_id``, or ``reset_position_ids`` without
            ``document_mask``.
    """

    def __init__(
        self,
        *,
        document_mask: bool = False,
        reset_position_ids: bool = False,
        eos_id: int | None = None,
    ) -> None:
        if document_mask and eos_id is None:
            raise ValueError("document_mask needs the tokenizer's eos_id, which ends documents")
        if reset_position_ids and not document_mask:
            raise ValueError("reset_position_ids needs document_mask")
        self.document_mask, self.reset_position_ids = document_mask, reset_position_ids
        self.eos_id = eos_id

    def __call__(self, rows: np.ndarray, indices: np.ndarray, stream: int) -> Batch:
        """rows: (B, R + 1) int64; indices, stream: unused (nothing is random)."""
        t = torch.from_numpy(rows)
        inputs = {"input_ids": t[:, :-1].contiguous()}
        if self.document_mask:
            documents = document_ids(rows[:, :-1], self.eos_id)
            inputs["document_ids"] = torch.from_numpy(documents)
            if self.reset_position_ids:
                inputs["position_ids"] = torch.from_numpy(document_positions(documents))
        return Batch(inputs, t[:, 1:].contiguous(), np.empty(0))


@dataclass(frozen=True)
class SpanLengths:
    """Span corruption of R raw tokens: counts (tokens) and the resulting fixed lengths, EOS
    included."""

    raw_length: int
    num_noise_tokens: int
    num_noise_spans: int
    inputs_length: int
    targets_length: int


def span_corruption_lengths(
    raw_length: int, noise_density: float, mean_noise_span_length: float
) -> SpanLengths:
    """Counts of span corruption over ``raw_length`` tokens, as T5's `random_spans_noise_mask`
    and `random_spans_helper`: noise = round(R x density) clamped to [1, R - 1], spans =
    max(1, round(noise / mean span length)); inputs = non-noise + one sentinel per span + EOS,
    targets = noise + one sentinel per span + EOS.

    Raises:
        ValueError: fewer than 2 raw tokens.
    """
    if raw_length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {raw_length}")
    noise = min(max(round(raw_length * noise_density), 1), raw_length - 1)
    spans = max(round(noise / mean_noise_span_length), 1)
    return SpanLengths(raw_length, noise, spans, raw_length - noise + spans + 1, noise + spans + 1)


def raw_length_for_inputs(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> int:
    """The longest raw length whose span-corrupted inputs fit ``inputs_length`` (T5's
    `random_spans_helper`): 568 raw tokens for 512 inputs at density 0.15, mean span 3. Use it
    to pick ``data.seq_len`` for a wanted encoder length.

    Raises:
        ValueError: ``inputs_length`` < 3 (no room for a token, a sentinel and EOS).
    """
    if inputs_length < 3:
        raise ValueError(f"inputs_length={inputs_length} leaves no room; use at least 3")
    raw = 2
    while span_corruption_lengths(raw + 1, noise_density, mean_noise_span_length).inputs_length <= (
        inputs_length
    ):
        raw += 1
    return raw


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Which of ``length`` tokens are noise: (length,) bool, alternating non-noise / noise spans,
    starting with non-noise and ending with noise, with the counts of
    :func:`span_corruption_lengths`; span lengths are a uniformly random composition of each
    count into the number of spans (T5's `_random_segmentation`)."""
    n = span_corruption_lengths(length, noise_density, mean_noise_span_length)

    def segment(num_items: int, num_segments: int) -> np.ndarray:
        # choose num_segments - 1 cut points among the num_items - 1 gaps
        cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
        return np.diff(np.concatenate([[0], cuts, [num_items]]))

    spans = n.num_noise_spans
    noise = segment(n.num_noise_tokens, spans)
    keep = segment(length - n.num_noise_tokens, spans)
    lengths = np.stack([keep, noise], axis=1).reshape(-1)  # keep0, noise0, keep1, noise1, ...
    return np.repeat(np.tile([False, True], spans), lengths)


def span_corruption(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one sequence.

    Inputs are the tokens with each noise span replaced by the next sentinel, then EOS; targets
    are, per span, its sentinel then its tokens, then EOS.

    Args:
        tokens: (R,) int64 raw tokens.
        noise_mask: (R,) bool from :func:`random_spans_noise_mask`.
        sentinel_ids: (N,) ids of ``<extra_id_0>``... (N >= number of spans).
        eos_id: appended to both.

    Returns:
        (inputs (R - noise + spans + 1,), targets (noise + spans + 1,)), int64.
    """
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # first token of a span
    spans = int(starts.sum())
    if spans > len(sentinel_ids):
        raise ValueError(f"{spans} noise spans but only {len(sentinel_ids)} sentinel ids")
    span_sentinel = np.zeros_like(tokens)
    span_sentinel[starts] = sentinel_ids[:spans]
    keep = ~noise_mask | starts
    inputs = np.where(starts, span_sentinel, tokens)[keep]
    noise = np.flatnonzero(noise_mask)
    opened = np.cumsum(starts[noise])  # spans opened up to and including each noise token
    slot = np.arange(len(noise)) + opened  # a sentinel precedes each span
    targets = np.empty(len(noise) + spans, dtype=np.int64)
    targets[slot] = tokens[noise]
    targets[slot[starts[noise]] - 1] = sentinel_ids[:spans]
    return (
        np.concatenate([inputs, [eos_id]]).astype(np.int64),
        np.concatenate([targets, [eos_id]]),
    )


def span_corruption_documents(
    documents: np.ndarray, noise_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The documents of :func:`span_corruption`'s inputs and targets: a kept token's own, a
    sentinel's and its span's target tokens' the document of the span's first token, the
    appended EOS's the last span's.

    Args:
        documents: (R,) int64 each raw token's document (:func:`document_ids`).
        noise_mask: (R,) bool, as given to :func:`span_corruption` (ends with noise).

    Returns:
        (inputs' (R - noise + spans + 1,), targets' (noise + spans + 1,)), int64.
    """
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    keep = ~noise_mask | starts
    span_documents = documents[starts]  # (spans,)
    span_of_noise = np.cumsum(starts)[noise_mask] - 1  # each noise token's span
    slots = np.arange(len(span_of_noise)) + span_of_noise + 1  # as span_corruption's
    targets = np.empty(len(span_of_noise) + len(span_documents), dtype=np.int64)
    targets[slots] = span_documents[span_of_noise]
    targets[slots[starts[noise_mask]] - 1] = span_documents  # the sentinels
    last = span_documents[-1:]
    return np.concatenate([documents[keep], last]), np.concatenate([targets, last])


def prefix_lm(tokens: np.ndarray, split: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``tokens[:split]`` + EOS and targets ``tokens[split:]`` + EOS, int64."""
    eos = np.array([eos_id], dtype=np.int64)
    return np.concatenate([tokens[:split], eos]), np.concatenate([tokens[split:], eos])


def prefix_lm_documents(documents: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents of :func:`prefix_lm`'s inputs and targets: the prefix tokens keep theirs;
    the targets are one span, so they and the encoder's EOS belong to the document the split
    falls in, ``documents[split]``. documents: (R,) int64 -> ((split + 1,), (R - split + 1,))."""
    doc = documents[split]
    inputs = np.concatenate([documents[:split], [doc]]).astype(np.int64)
    return inputs, np.full(len(documents) - split + 1, doc, dtype=np.int64)


def mixture_lengths(objectives, raw_length: int) -> tuple[int, int]:
    """(I, L): the encoder and decoder lengths every batch of an encoder-decoder mixture is
    padded to, the longest any of its objectives produces from ``raw_length`` tokens.

    Raises:
        ValueError: an objective that is not an encoder-decoder one.
    """
    inputs, targets = [], []
    for o in objectives:
        if o.type == "span_corruption":
            n = span_corruption_lengths(raw_length, o.noise_density, o.mean_noise_span_length)
            inputs.append(n.inputs_length)
            targets.append(n.targets_length)
        elif o.type == "prefix_lm":
            inputs.append(raw_length)  # split in [1, R - 1]: at most R - 1 tokens + EOS
            targets.append(raw_length)
        else:
            raise ValueError(f"objective {o.type!r} is not an encoder-decoder objective")
    return max(inputs), max(targets)


class Seq2Seq:
    """Encoder-decoder examples from a weighted mixture of ``span_corruption`` and ``prefix_lm``
    objectives (their configs from ``objective.mixture``).

    Every example of a batch is padded to the longest the mixture can produce: I = the span
    corruption inputs length (R with a prefix LM objective), L likewise for the targets. With
    span corruption alone nothing is padded.

    Args:
        objectives: objective configs (``type``, ``weight`` and their settings).
        raw_length: R, tokens of each packed row used (``data.seq_len``).
        sentinel_ids: (N,) ids of ``<extra_id_0>``... from the tokenizer.
        eos_id, pad_id, decoder_start_id: the special ids (decoder inputs start with
            ``decoder_start_id``, T5's pad).
        seed: ``data.seed``.
        document_mask: add ``document_ids`` (B, I) and ``decoder_document_ids`` (B, L) to the
            inputs and restart the decoder inputs at each document (see the module docstring).

    Raises:
        ValueError: an objective of another family, or more noise spans than sentinels.
    """

    def __init__(
        self,
        objectives,
        *,
        raw_length: int,
        sentinel_ids: np.ndarray,
        eos_id: int,
        pad_id: int,
        decoder_start_id: int,
        seed: int,
        document_mask: bool = False,
    ) -> None:
        self.objectives = list(objectives)
        self.document_mask = document_mask
        self.raw_length = raw_length
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id, self.pad_id, self.decoder_start_id = eos_id, pad_id, decoder_start_id
        self.seed = seed
        weights = np.array([o.weight for o in self.objectives], dtype=np.float64)
        self.probs = weights / weights.sum()
        for o in self.objectives:
            if o.type != "span_corruption":
                continue
            n = span_corruption_lengths(raw_length, o.noise_density, o.mean_noise_span_length)
            if n.num_noise_spans > len(self.sentinel_ids):
                raise ValueError(
                    f"span corruption of {raw_length} tokens makes {n.num_noise_spans} spans "
                    f"but the tokenizer has {len(self.sentinel_ids)} sentinels"
                )
        self.inputs_length, self.targets_length = mixture_lengths(self.objectives, raw_length)

    def lengths(self) -> tuple[int, int]:
        """(I, L): encoder and decoder lengths of every batch."""
        return self.inputs_length, self.targets_length

    def example(self, tokens: np.ndarray, index: int, stream: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets, objective index) of the raw ``tokens`` (R,) of sample ``index``."""
        return self._example(tokens, index, stream)[:3]

    def _example(
        self, tokens: np.ndarray, index: int, stream: int, documents: np.ndarray | None = None
    ) -> tuple:
        """`example`, then the documents of the inputs and targets (None without
        ``documents``, the raw tokens' (R,))."""
        rng = np.random.default_rng((self.seed, stream, index))
        k = 0 if len(self.objectives) == 1 else int(rng.choice(len(self.objectives), p=self.probs))
        o = self.objectives[k]
        if o.type == "span_corruption":
            mask = random_spans_noise_mask(
                len(tokens), o.noise_density, o.mean_noise_span_length, rng
            )
            docs = None if documents is None else span_corruption_documents(documents, mask)
            return (*span_corruption(tokens, mask, self.sentinel_ids, self.eos_id), k, docs)
        split = int(rng.integers(1, len(tokens)))
        docs = None if documents is None else prefix_lm_documents(documents, split)
        return (*prefix_lm(tokens, split, self.eos_id), k, docs)

    def __call__(self, rows: np.ndarray, indices: np.ndarray, stream: int) -> Batch:
        """rows: (B, R + 1) packed rows (the last token is not used); indices: (B,) global
        sample indices (the seed of each example); stream: train or validation.

        Returns a :class:`Batch` with inputs ``input_ids`` (B, I), ``attention_mask`` (B, I)
        (1 = token), ``decoder_input_ids`` (B, L) and labels (B, L) (``-100`` on padding); with
        ``document_mask`` also ``document_ids`` (B, I) and ``decoder_document_ids`` (B, L)
        (-1 on padding).
        """
        B, (enc_len, dec_len) = len(rows), self.lengths()
        input_ids = np.full((B, enc_len), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((B, enc_len), dtype=np.int64)
        labels = np.full((B, dec_len), IGNORE_INDEX, dtype=np.int64)
        enc_docs = np.full((B, enc_len), -1, dtype=np.int64)
        dec_docs = np.full((B, dec_len), -1, dtype=np.int64)
        raw = rows[:, : self.raw_length]
        raw_docs = document_ids(raw, self.eos_id) if self.document_mask else [None] * B
        for b, index in enumerate(np.asarray(indices).tolist()):
            inputs, targets, _, docs = self._example(raw[b], index, stream, raw_docs[b])
            input_ids[b, : len(inputs)] = inputs
            attention_mask[b, : len(inputs)] = 1
            labels[b, : len(targets)] = targets
            if docs is not None:
                enc_docs[b, : len(inputs)], dec_docs[b, : len(targets)] = docs
        decoder_input_ids = np.concatenate(
            [np.full((B, 1), self.decoder_start_id), np.where(labels < 0, self.pad_id, labels)],
            axis=1,
        )[:, :dec_len]
        inputs = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        }
        if self.document_mask:
            # each document's first target is decoded behind the start id, as if alone
            restart = np.zeros((B, dec_len), dtype=bool)
            restart[:, 1:] = (dec_docs[:, 1:] != dec_docs[:, :-1]) & (dec_docs[:, 1:] >= 0)
            decoder_input_ids[restart] = self.decoder_start_id
            inputs["document_ids"] = torch.from_numpy(enc_docs)
            inputs["decoder_document_ids"] = torch.from_numpy(dec_docs)
        return Batch(inputs, torch.from_numpy(labels), np.empty(0))


Objective = CausalLM | Seq2Seq


def is_causal(objectives) -> bool:
    """Whether the mixture is next-token prediction (a decoder's) rather than encoder-decoder
    objectives; the config check never mixes the two."""
    return all(o.type == "causal_lm" for o in objectives)


def model_lengths(objectives: Sequence[ObjectiveConfig], seq_len: int) -> tuple[int, ...]:
    """The lengths of the model's inputs, in tokens, for ``seq_len`` raw tokens per sequence:
    ``(R,)`` for causal LM, ``(I, L)`` (encoder, decoder; :func:`mixture_lengths`) for
    encoder-decoder objectives; what the family spec's FLOPs and activation counts take."""
    if is_causal(objectives):
        return (seq_len,)
    return mixture_lengths(objectives, seq_len)


def build_objective(
    cfg: KilnConfig, sentinel_ids: np.ndarray | None = None, eos_id: int | None = None
) -> Objective:
    """The objective of the run's ``objective.mixture``: causal LM, or the encoder-decoder
    mixture (which needs the tokenizer's ``sentinel_ids`` for span corruption and the model's
    special ids), with ``data.document_mask`` / ``data.reset_position_ids``.

    Args:
        cfg: the run config.
        sentinel_ids: the tokenizer's sentinel ids (encoder-decoder objectives).
        eos_id: the tokenizer's EOS id, which ends each packed document: needed by a decoder
            with ``data.document_mask`` (an encoder-decoder's is ``model.eos_token_id``).

    Raises:
        ValueError: as :class:`CausalLM` and :class:`Seq2Seq`.
    """
    m, d = cfg.derived.model, cfg.data
    if is_causal(cfg.derived.objectives):
        return CausalLM(
            document_mask=d.document_mask, reset_position_ids=d.reset_position_ids, eos_id=eos_id
        )
    return Seq2Seq(
        cfg.derived.objectives,
        raw_length=cfg.data.seq_len,
        sentinel_ids=np.zeros(0, np.int64) if sentinel_ids is None else sentinel_ids,
        eos_id=m.eos_token_id,
        pad_id=m.pad_token_id,
        decoder_start_id=m.decoder_start_token_id,
        seed=cfg.data.seed,
        document_mask=d.document_mask,
    )


def check_tokenizer(cfg: KilnConfig, tokenizer) -> None:
    """Refuse a tokenizer the run cannot use: more pieces than ``model.vocab_size``, special ids
    other than those the model config names, or fewer sentinels than the spans span corruption
    makes in one sequence. The one place this is checked (before any process starts, and again
    in the workers for a tokenizer that changed since).

    Raises:
        ValueError: the message says how to get a fitting tokenizer.
    """
    m = cfg.derived.model
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(
            f"{tokenizer.path} has {tokenizer.vocab_size} pieces, more than model.vocab_size="
            f"{m.vocab_size}; raise model.vocab_size or leave it unset"
        )
    for field in ("pad_token_id", "eos_token_id"):
        if field not in type(m).model_fields:  # a family whose config names no special ids
            continue
        want = getattr(tokenizer, field.removesuffix("_token_id") + "_id")
        if getattr(m, field) != want:
            raise ValueError(
                f"model.{field}={getattr(m, field)} but tokenizer {tokenizer.path} uses {want}; "
                f"set model.{field}={want}"
            )
    have = len(tokenizer.sentinel_ids)
    for o in cfg.derived.objectives:
        if o.type != "span_corruption":
            continue
        need = span_corruption_lengths(
            cfg.data.seq_len, o.noise_density, o.mean_noise_span_length
        ).num_noise_spans
        if have < need:
            raise ValueError(
                f"span corruption of data.seq_len={cfg.data.seq_len} tokens needs {need} "
                f"sentinel pieces but tokenizer {tokenizer.path} has {have} (<extra_id_0>... "
                f"missing: it was trained for a decoder?); train a tokenizer with "
                f"tokenizer.num_sentinels>={need} (delete it, or point tokenizer.path at a new "
                f"file, then re-run `kiln data prepare CONFIG --force`)"
            )


def describe(objectives: Sequence[ObjectiveConfig], seq_len: int) -> str:
    """One line on the objectives and their lengths for ``seq_len`` raw tokens per sequence, for
    logs and `--dry-run`."""
    if is_causal(objectives):
        return f"causal LM over {seq_len} tokens"
    enc_len, dec_len = mixture_lengths(objectives, seq_len)
    parts = []
    for o in objectives:
        if o.type == "span_corruption":
            n = span_corruption_lengths(seq_len, o.noise_density, o.mean_noise_span_length)
            parts.append(
                f"span_corruption x{o.weight:g} (density {o.noise_density}, mean span "
                f"{o.mean_noise_span_length}: {n.num_noise_tokens} noise tokens in "
                f"{n.num_noise_spans} spans)"
            )
        else:
            parts.append(f"prefix_lm x{o.weight:g}")
    pad = " (padded)" if any(o.type == "prefix_lm" for o in objectives) else ""
    lengths = f"encoder {enc_len}, decoder {dec_len}{pad}"
    return f"{' + '.join(parts)}: {seq_len} raw tokens -> {lengths}"


def describe_documents(data: DataConfig) -> str:
    """One line on how the documents packed in a row see each other (``data.document_mask``,
    ``data.reset_position_ids``), for `--dry-run` and the model card (a training setting: the
    published model has no mask)."""
    if not data.document_mask:
        return "packed rows, attention across document boundaries (data.document_mask=false)"
    line = "packed rows, attention within each document (data.document_mask=true)"
    if data.reset_position_ids:
        line += ", positions restart per document (data.reset_position_ids=true)"
    return line
