"""Hugging Face export of the tokenizer: AutoTokenizer loads it offline and encodes, decodes and
adds special tokens exactly as Kiln does (English, Korean with byte fallback, code, digits,
spaces, T5 sentinels), for BPE and unigram; and the check reports a broken export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.hf_tokenizer import save_hf_tokenizer, tokenizer_mismatches
from model.tokenizer import Tokenizer, sentinel_piece, train_tokenizer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # real text beside the repo
SENTINELS = 16
KEYS = [("bpe", "llama"), ("bpe", "t5"), ("unigram", "llama"), ("unigram", "t5")]
IDS = ["-".join(k) for k in KEYS]

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  two leading spaces, three trailing   ",
    "line one\nline two\r\n\n\tline four with a tab\n",
    "digits 2024 and 3.14159 and 1,000,000",
    "정말 재미있는 영화였어요!! 배우들 연기가 최고",
    "rare syllables 뷁 똠 햏 and emoji 😀 fall back to bytes",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None\n",
    "",
]
T5_TEXTS = ["The <extra_id_0> brown fox <extra_id_3>over the<extra_id_15> dog."]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    en = (REPO / "sample" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    ko = (DATA / "nsmc_ko" / "nsmc_reviews_dev.txt").read_text(encoding="utf-8")
    code = (DATA / "code_python" / "pallets_flask_click_jinja.py.txt").read_text(encoding="utf-8")
    return [en[:20_000], ko[:20_000], code[:20_000]]


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory) -> dict[tuple[str, str], tuple[Tokenizer, Path]]:
    """(Kiln tokenizer, exported folder) per (sentencepiece model, HF model type); T5 ones hold
    16 sentinels."""
    out = {}
    for sp_type, hf_type in KEYS:
        root = tmp_path_factory.mktemp(f"hf-{sp_type}-{hf_type}")
        tok = train_tokenizer(
            corpus,
            root / "kiln" / "tokenizer.model",
            vocab_size=1200,
            model_type=sp_type,
            character_coverage=0.98,
            num_sentinels=SENTINELS if hf_type == "t5" else 0,
        )
        save_hf_tokenizer(tok, root / "hf", model_type=hf_type, model_max_length=256)
        out[sp_type, hf_type] = tok, root / "hf"
    return out


def _texts(corpus: list[str], hf_type: str) -> list[str]:
    # Unseen slices of each source (a few KB) besides the hand-written cases.
    docs = [src[-3000:] for src in corpus]
    return [*TEXTS, *docs, *(T5_TEXTS if hf_type == "t5" else [])]


def test_files_written(exported):
    tok, folder = exported["bpe", "t5"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert (folder / "tokenizer.model").read_bytes() == tok.path.read_bytes()


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_auto_tokenizer_matches_kiln(exported, corpus, key):
    tok, folder = exported[key]
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert hf.is_fast
    sentinels = set(tok.sentinel_ids.tolist())
    for text in _texts(corpus, key[1]):
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        default = [*ids, tok.eos_id] if key[1] == "t5" else ids  # T5 appends EOS, Llama nothing
        assert hf.encode(text) == default
        assert hf(text)["input_ids"] == default
        plain = text
        for i in range(SENTINELS):
            plain = plain.replace(sentinel_piece(i), "")
        assert hf.decode(ids, skip_special_tokens=True) == plain
        assert hf.decode(ids) == text
        if sentinels and any(p in text for p in map(sentinel_piece, range(SENTINELS))):
            assert sentinels & set(ids)
    assert tokenizer_mismatches(folder, tok, _texts(corpus, key[1]), model_type=key[1]) == []


def test_byte_fallback_and_whitespace_pieces_are_exercised(exported):
    tok, folder = exported["bpe", "llama"]
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pieces = hf.convert_ids_to_tokens(hf.encode("뷁 😀", add_special_tokens=False))
    assert pieces[:3] == ["<0xEB>", "<0xB7>", "<0x81>"]  # a syllable outside the vocabulary
    assert [tok.id_to_piece(i) for i in tok.encode("뷁")] == pieces[:3]
    assert hf.tokenize("a\n        b")[2] == "\u2581" * 8  # one indentation piece
    assert hf.tokenize("2024") == ["2", "0", "2", "4"]


@pytest.mark.parametrize("key", [("bpe", "llama"), ("unigram", "t5")], ids=["llama", "t5"])
def test_special_tokens_and_config(exported, key):
    tok, folder = exported[key]
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert (hf.unk_token, hf.bos_token, hf.eos_token, hf.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.model_max_length == 256
    assert len(hf) == tok.vocab_size == 1200
    batch = hf(["a b c d e", "a"], padding=True)["input_ids"]
    assert batch[1][-1] == 3  # padded with <pad>
    if key[1] == "t5":
        assert hf.convert_tokens_to_ids("<extra_id_0>") == tok.vocab_size - 1
        assert hf.convert_tokens_to_ids("<extra_id_15>") == tok.vocab_size - 16
        assert [str(t) for t in hf.extra_special_tokens] == [
            sentinel_piece(i) for i in range(SENTINELS)
        ]
        assert hf.tokenize("a<extra_id_3>b") == ["a", "<extra_id_3>", "b"]
    else:
        assert not hf.extra_special_tokens


@pytest.mark.parametrize("key", [("bpe", "llama"), ("bpe", "t5")], ids=["llama", "t5"])
def test_loads_beside_a_model_config(exported, corpus, key, tmp_path):
    # `kiln publish` puts the model's config.json (model_type llama or t5) in the same folder;
    # AutoTokenizer must still take tokenizer.json as written, not rebuild Llama's or T5's.
    tok, folder = exported[key]
    shutil.copytree(folder, tmp_path / "m")
    config = transformers.LlamaConfig() if key[1] == "llama" else transformers.T5Config()
    config.vocab_size = tok.vocab_size
    config.save_pretrained(tmp_path / "m")
    assert (
        tokenizer_mismatches(tmp_path / "m", tok, _texts(corpus, key[1]), model_type=key[1]) == []
    )


def test_sentencepiece_backend_encodes_like_kiln(exported, corpus):
    tok, folder = exported["unigram", "t5"]
    slow = transformers.SentencePieceBackend.from_pretrained(folder, local_files_only=True)
    for text in _texts(corpus, "t5"):
        assert slow.encode(text, add_special_tokens=False) == tok.encode(text)


def _broken(folder: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(folder, out)
    edit(out)
    return out


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _prepend_space(folder: Path) -> None:  # what LlamaConverter's Metaspace would do
    def change(obj):
        obj["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        }

    _edit_json(folder / "tokenizer.json", change)


def _drop_merges(folder: Path) -> None:
    _edit_json(folder / "tokenizer.json", lambda obj: obj["model"].update(merges=[]))


def _pad_is_unk(folder: Path) -> None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        _edit_json(folder / name, lambda obj: obj.update(pad_token="<unk>"))


def _no_eos(folder: Path) -> None:  # transformers 5 takes EOS from tokenizer.json's template
    _edit_json(folder / "tokenizer.json", lambda obj: obj.update(post_processor=None))


def _stock_llama_class(folder: Path) -> None:  # transformers 5 rebuilds Llama's pipeline
    _edit_json(
        folder / "tokenizer_config.json", lambda obj: obj.update(tokenizer_class="LlamaTokenizer")
    )


def _no_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").unlink()


BREAKS = {
    "prepend_space": (_prepend_space, ("bpe", "llama"), "encode(add_special_tokens=False)"),
    "drop_merges": (_drop_merges, ("bpe", "t5"), "encode(add_special_tokens=False)"),
    "pad_is_unk": (_pad_is_unk, ("bpe", "llama"), "pad_token is '<unk>' id 0"),
    "no_eos": (_no_eos, ("unigram", "t5"), "encode() with default special tokens"),
    "stock_llama_class": (_stock_llama_class, ("bpe", "llama"), "LlamaTokenizer"),
    "missing_files": (_no_tokenizer_json, ("bpe", "llama"), "failed"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_mismatches_are_reported(exported, tmp_path, name):
    edit, key, expected = BREAKS[name]
    tok, folder = exported[key]
    broken = _broken(folder, tmp_path, edit)
    found = tokenizer_mismatches(broken, tok, TEXTS, model_type=key[1])
    assert found and any(expected in line for line in found), found


def test_literal_special_token_text_is_explained(exported):
    tok, folder = exported["bpe", "llama"]
    found = tokenizer_mismatches(folder, tok, ["html <s>struck</s> text"], model_type="llama")
    assert found and "literally" in found[0]


def test_bad_arguments(exported, tmp_path):
    tok, _ = exported["bpe", "llama"]
    with pytest.raises(ValueError, match="model_type"):
        save_hf_tokenizer(tok, tmp_path, model_type="gpt2", model_max_length=8)
    with pytest.raises(ValueError, match="model_max_length"):
        save_hf_tokenizer(tok, tmp_path, model_type="llama", model_max_length=0)
