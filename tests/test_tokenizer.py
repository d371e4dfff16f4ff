"""The sentencepiece tokenizer: training on English and Korean, exact round trips, special ids,
metadata, byte accounting for bits-per-byte, and clear errors."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import (
    BOS_ID,
    EOS_ID,
    META_FILE,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    keyed_line_sample,
    merge_line_samples,
    sample_lines,
    train_tokenizer,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # real text beside the repo

# Settings that fit a few KB of text: English needs ~330 pieces (260 special + byte pieces and its
# characters); Korean keeps ~500 distinct syllables at coverage 0.98.
SETTINGS = {
    "en": {"vocab_size": 400, "character_coverage": 0.9995},
    "ko": {"vocab_size": 1000, "character_coverage": 0.98},
}

ROUND_TRIP = [
    "Hello, world! It was the best of times.",
    "  two leading spaces, trailing tab\t",
    "line one\nline two\r\n\nline four\n",
    "한국어 텍스트입니다. 정말 재미있는 영화였어요!!",
    "mixed 한국어 and English 😀🎉 with digits 1234567890 and 3.14",
    "unseen: Ωμέγα ελληνικά, 漢字, ภาษาไทย, ❄, \u00e9 vs e\u0301, ﬁ ligature",
    "indented:\n    def f(x):\n        return x  # comment\n",
    "",
]


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    en = (DATA / "gutenberg_en" / "books" / "carroll_alice_in_wonderland.txt").read_text(
        encoding="utf-8"
    )
    ko = (DATA / "nsmc_ko" / "nsmc_reviews_dev.txt").read_text(encoding="utf-8")
    return {"en": en[20_000:26_000], "ko": ko[:6_000]}


@pytest.fixture(scope="module")
def tokenizers(texts, tmp_path_factory) -> dict[tuple[str, str], Tokenizer]:
    out = {}
    for lang in ("en", "ko"):
        for model_type in ("bpe", "unigram"):
            path = tmp_path_factory.mktemp(f"tok-{lang}-{model_type}") / "tokenizer.model"
            out[lang, model_type] = train_tokenizer(
                [texts[lang]], path, model_type=model_type, **SETTINGS[lang]
            )
    return out


KEYS = [("en", "bpe"), ("en", "unigram"), ("ko", "bpe"), ("ko", "unigram")]


@pytest.mark.parametrize("key", KEYS, ids=["-".join(k) for k in KEYS])
def test_round_trip_is_exact(tokenizers, texts, key):
    tok = tokenizers[key]
    assert tok.vocab_size == SETTINGS[key[0]]["vocab_size"]
    for text in [*ROUND_TRIP, texts[key[0]][:2000]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert BOS_ID not in ids and EOS_ID not in ids
        assert UNK_ID not in ids  # byte fallback: nothing is unknown


@pytest.mark.parametrize("key", KEYS, ids=["-".join(k) for k in KEYS])
def test_token_bytes_add_up_to_utf8_length(tokenizers, key):
    tok = tokenizers[key]
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype == np.int32
    for text in ROUND_TRIP:
        assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))
    assert tb[[UNK_ID, BOS_ID, EOS_ID, PAD_ID]].tolist() == [0, 0, 0, 0]
    assert tb[tok.encode("😀")].tolist() == [1, 1, 1, 1]  # four byte pieces


def test_special_ids_and_pieces(tokenizers):
    for tok in tokenizers.values():
        assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
        assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
        assert tok.decode([BOS_ID, *tok.encode("ab"), EOS_ID, PAD_ID]) == "ab"


def test_digits_are_split(texts, tmp_path):
    numbers = "\n".join(f"in {1800 + i} it cost {i * 1234} pounds" for i in range(300))
    tok = train_tokenizer([texts["en"], numbers], tmp_path / "t.model", vocab_size=400)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "2" in pieces
    learned = [p for p in pieces if not (p.startswith("<") and p.endswith(">"))]
    assert not [p for p in learned if sum(c.isdigit() for c in p) > 1]
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_meta_file_and_load(tokenizers):
    tok = tokenizers["ko", "unigram"]
    meta = json.loads((tok.path.parent / META_FILE).read_text())
    assert meta["model_type"] == "unigram"
    assert meta["vocab_size"] == tok.vocab_size == 1000
    assert meta["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert meta["sha256"] == tok.sha256
    assert 0 < meta["sentences_sampled"] <= meta["sentences_seen"]
    again = Tokenizer.load(tok.path)
    assert again.sha256 == tok.sha256 and len(tok.sha256) == 64
    text = ROUND_TRIP[4]
    assert again.encode(text) == tok.encode(text)
    assert again.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text) and clone.sha256 == tok.sha256
    assert not list(tok.path.parent.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_training_is_deterministic(texts, tmp_path):
    a = train_tokenizer([texts["en"]], tmp_path / "a" / "t.model", vocab_size=400)
    b = train_tokenizer([texts["en"]], tmp_path / "b" / "t.model", vocab_size=400)
    assert a.sha256 == b.sha256


def test_line_sample_is_seeded_bounded_and_mergeable():
    docs = [f"doc {i}\n\nline {i}\n   \n" for i in range(1000)]
    sample, seen = sample_lines(iter(docs), 50, seed=1)
    assert seen == 2000 and len(sample) == 50  # blank and whitespace-only lines are not counted
    assert sample == sample_lines(iter(docs), 50, seed=1)[0]
    assert sample != sample_lines(iter(docs), 50, seed=2)[0]
    # a uniform sample reaches the end of the stream, not just its first lines
    assert max(int(s.split()[1]) for s in sample) > 500
    assert sorted(sample_lines(["a\nb"], 10)[0]) == ["a", "b"]
    # parts of the corpus sampled apart (as Ray tasks do) and merged give the same sample
    parts = [
        keyed_line_sample(docs[a : a + 300], 50, seed=1, first_doc=a) for a in (0, 300, 600, 900)
    ]
    assert merge_line_samples(parts, 50) == (sample, 2000)
    # every line is about equally likely: lines of the first and the second half of the corpus
    # each make about half of a large sample
    big, _ = sample_lines(iter(docs), 1000, seed=3)
    first_half = sum(int(s.split()[1]) < 500 for s in big)
    assert 430 < first_half < 570


def test_input_sentence_size_caps_the_sample(texts, tmp_path):
    tok = train_tokenizer(
        [texts["en"]],
        tmp_path / "t.model",
        vocab_size=300,
        input_sentence_size=50,
        character_coverage=0.98,
    )
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["sentences_sampled"] == 50 < meta["sentences_seen"]
    assert tok.decode(tok.encode(ROUND_TRIP[4])) == ROUND_TRIP[4]


def test_vocab_size_errors_say_what_to_change(texts, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=200 .*raise tokenizer.vocab_size"):
        train_tokenizer([texts["en"]], tmp_path / "t.model", vocab_size=200)
    with pytest.raises(ValueError, match=r"lower tokenizer.vocab_size to at most \d+"):
        train_tokenizer([texts["en"]], tmp_path / "t.model", vocab_size=20_000)
    with pytest.raises(ValueError, match=r"need at least \d+ pieces.*character_coverage"):
        train_tokenizer([texts["ko"]], tmp_path / "t.model", vocab_size=400)
    with pytest.raises(ValueError, match=r"character_coverage=0\.5 is outside"):
        train_tokenizer([texts["en"]], tmp_path / "t.model", vocab_size=400, character_coverage=0.5)
    with pytest.raises(ValueError, match="no non-blank line"):
        train_tokenizer(["", "  \n"], tmp_path / "t.model", vocab_size=400)
    assert not (tmp_path / "t.model").exists()


def test_load_missing_file_says_how_to_make_it(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=r"nope/tokenizer.model.*kiln tokenizer train"):
        Tokenizer.load(missing)


def test_tokenizer_module_imports_no_trainer_or_distributed():
    src = (Path(__file__).resolve().parents[1] / "model" / "tokenizer.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    banned = ("trainer", "deepspeed", "torch.distributed", "ray", "launcher")
    assert not [n for n in names if n.split(".")[0] in banned or n.startswith(banned)]
