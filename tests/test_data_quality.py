"""Data that is counted, never silently odd: malformed json lines counted and skipped, lines of
spaces as paragraph breaks, a validation split by sequences when the documents are too few, the
refusal of datasets that lose too many documents or have no validation sequence, and the likely
encoding of files that are not UTF-8. Small files in tmp_path, the tiny tokenizer of test_data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_data import DATA, VOCAB, check_prepared, make_cfg, one, read_split, skips, write

from model.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from trainer.config import SourceConfig
from trainer.data.prepare import prepare_all
from trainer.data.sources import (
    MALFORMED_JSON,
    NotUtf8,
    classify,
    describe_not_utf8,
    find_not_utf8,
    guess_encoding,
    iconv_name,
    load_source,
    malformed_json_lines,
)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Speeches of at least 80 characters, as test_data's."""
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]
    return [p for p in text.split("\n\n") if len(p) >= 80][:60]


@pytest.fixture(scope="module")
def tok(paragraphs, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(paragraphs, path, vocab_size=VOCAB)


# French text with accents: Latin-1 bytes that are not UTF-8 in every paragraph.
FRENCH = [
    "Le cœur a ses raisons que la raison ne connaît point ; on le sait en mille choses.",
    "Élève-toi, pensée, au-dessus de ce monde où l'été déçoit et où l'hiver s'éternise.",
    "Très chère amie, je vous écris de la campagne où les blés mûrissent déjà à côté du lac.",
    "À la fenêtre, un garçon regardait passer les bœufs et les charrettes chargées de foin.",
]


def texts(src: SourceConfig) -> list[str | None]:
    return list(load_source(src)["text"])


# ---------------------------------------------------------------------------------------------
# malformed json lines


def test_malformed_json_lines_are_counted_skipped_and_named(tmp_path, tok, paragraphs, caplog):
    lines = [json.dumps({"text": p, "n": i}) for i, p in enumerate(paragraphs[:30])]
    lines.insert(2, '{"text": "cut short')  # line 3
    lines.insert(7, "")  # a blank line: not a record
    lines.insert(9, "[1, 2]")  # line 10: JSON, not an object
    src = write(tmp_path / "raw" / "docs.jsonl", "\n".join(lines) + "\n")
    assert malformed_json_lines(src) == [3, 10]
    # one document per record, the malformed ones at their place
    got = texts(SourceConfig(path=str(src)))
    assert len(got) == 32 and got[2] == got[8] == MALFORMED_JSON
    assert classify(MALFORMED_JSON) == "malformed_json"
    assert [t for t in got if t != MALFORMED_JSON] == paragraphs[:30]

    cfg = make_cfg(tmp_path / "data", [one("j", {"path": str(src)})], tok)
    with caplog.at_level(logging.WARNING, logger="trainer.data.prepare"):
        (man,) = prepare_all(cfg)
    assert man["documents"]["total"] == 32 and man["documents"]["usable"] == 30
    assert man["skipped"] == skips(malformed_json=2)
    check_prepared(cfg.dataset_dir("j"), man, tok, paragraphs[:30])
    assert f"{src} has 2 malformed json lines (lines 3, 10)" in caplog.text
    # prepared again from the copy with the same numbering
    (again,) = prepare_all(cfg, force=True)
    assert again == man


def test_a_broken_json_array_says_where(tmp_path, tok, paragraphs):
    body = json.dumps([{"text": p} for p in paragraphs[:3]], indent=1)
    src = write(tmp_path / "raw.json", body.replace("}", "", 1))
    cfg = make_cfg(tmp_path / "data", [one("a", {"path": str(src)})], tok)
    with pytest.raises(ValueError, match=r"raw.json is a JSON array that does not parse \(line \d"):
        prepare_all(cfg)
    good = write(tmp_path / "good.json", body)
    assert malformed_json_lines(good) == []
    assert texts(SourceConfig(path=str(good))) == paragraphs[:3]


def test_a_json_source_that_fails_without_a_malformed_line_is_one_message(tmp_path):
    # every line parses, but the text field changes type: no line to skip, so a clean error
    src = write(tmp_path / "mixed.jsonl", '{"text": "a"}\n{"text": "b", "text": "c"}\n')
    assert malformed_json_lines(src) == []
    with pytest.raises(ValueError, match=r"cannot read json source .*mixed.jsonl.*one JSON object"):
        texts(SourceConfig(path=str(src)))


# ---------------------------------------------------------------------------------------------
# lines of spaces separate paragraphs


def test_lines_of_spaces_and_tabs_separate_paragraphs(tmp_path, paragraphs):
    paras = paragraphs[:6]
    # WikiText's layout: paragraphs separated by lines holding one space; tabs, CRLF, runs
    spaced = ["\n \n", "\n\t\n", "\r\n  \t \r\n", "\n\n   \n\n", "\n \n \n", "\n \n"]
    empty = ["\n\n", "\n\n", "\r\n\r\n", "\n\n\n\n", "\n\n\n", "\n\n"]
    got = {}
    for name, seps in (("spaced", spaced), ("empty", empty)):
        body = "".join(p + s for p, s in zip(paras, seps, strict=True))
        src = write(tmp_path / f"{name}.txt", body.encode())
        got[name] = texts(SourceConfig(path=str(src), sample_by="paragraph"))
    assert got["spaced"] == got["empty"]  # exactly as empty lines
    assert got["spaced"][:5] == paras[:5] and got["spaced"][5] == "\n" + paras[5]
    # a line of spaces inside a paragraph's line stays: only whole lines of spaces separate
    inner = write(tmp_path / "inner.txt", "one line  \n  two line\n")
    assert texts(SourceConfig(path=str(inner), sample_by="paragraph")) == [
        "one line  \n  two line\n"
    ]


def test_wikitext_layout_prepares_one_document_per_paragraph(tmp_path, tok, paragraphs):
    heads = [f" = Section {i} = " for i in range(10)]
    body = "".join(f" \n{h}\n \n {p} \n" for h, p in zip(heads, paragraphs[:10], strict=True))
    src = write(tmp_path / "wiki.train.tokens", body)
    cfg = make_cfg(
        tmp_path / "data",
        [one("w", {"path": str(src), "format": "text", "sample_by": "paragraph"})],
        tok,
    )
    (man,) = prepare_all(cfg)
    assert man["documents"]["total"] == 20 and man["skipped"]["empty"] == 0


# ---------------------------------------------------------------------------------------------
# the validation split


def test_too_few_documents_are_split_by_sequences(tmp_path, tok, paragraphs, caplog):
    docs = ["\n".join(paragraphs[:30]), "\n".join(paragraphs[30:60])]
    for i, d in enumerate(docs):
        write(tmp_path / "raw" / f"book{i}.txt", d)
    cfg = make_cfg(
        tmp_path / "data",
        [one("b", {"path": str(tmp_path / "raw")})],
        tok,
        validation_fraction=0.03,
    )
    with caplog.at_level(logging.WARNING, logger="trainer.data.prepare"):
        (man,) = prepare_all(cfg)
    assert "too few to split by whole documents" in caplog.text
    assert man["validation_split"] == "sequences"
    tr, va = man["splits"]["train"], man["splits"]["validation"]
    n_seq = tr["sequences"] + va["sequences"]
    assert va["sequences"] == round(0.03 * n_seq) > 0  # not half of them
    # the second book is cut: in both splits
    assert man["documents"] == {"total": 2, "usable": 2, "train": 2, "validation": 1}
    # the two splits are the stream of all documents, cut after train's last sequence
    root = cfg.dataset_dir("b")
    stream = np.concatenate([[*tok.encode(d), EOS_ID] for d in docs])
    both = np.concatenate([read_split(root, man, "train"), read_split(root, man, "validation")])
    np.testing.assert_array_equal(both, stream[: n_seq * 17])
    assert tr["dropped_tokens"] == 0 and va["tokens"] == len(stream) - tr["tokens"]


def test_enough_documents_are_split_by_documents(tmp_path, tok, paragraphs):
    src = write(tmp_path / "a.txt", "\n\n".join(paragraphs[:40]))
    ds = [one("d", {"path": str(src), "sample_by": "paragraph"})]
    (man,) = prepare_all(make_cfg(tmp_path / "data", ds, tok, validation_fraction=0.1))
    assert man["validation_split"] == "documents" and man["documents"]["validation"] == 4


def test_no_validation_sequence_is_refused_with_the_fix(tmp_path, tok, paragraphs):
    text = paragraphs[0]
    src = write(tmp_path / "short.txt", text)
    ds = [one("s", {"path": str(src)})]
    row = len(tok.encode(text)) + 1  # the whole dataset is one sequence
    cfg = make_cfg(tmp_path / "data", ds, tok, seq_len=row - 1, validation_fraction=0.1)
    with pytest.raises(ValueError, match=r"'s' holds \d+ tokens, one sequence.*fraction=0 to"):
        prepare_all(cfg)
    assert not cfg.dataset_dir("s").exists()
    (man,) = prepare_all(
        make_cfg(tmp_path / "data", ds, tok, seq_len=row - 1, validation_fraction=0)
    )
    assert man["splits"]["train"]["sequences"] == 1
    with pytest.raises(ValueError, match=r"less than one sequence.*shorten data.seq_len"):
        prepare_all(make_cfg(tmp_path / "data2", ds, tok, seq_len=row, validation_fraction=0))


# ---------------------------------------------------------------------------------------------
# too many skipped documents; files that are not UTF-8


def test_a_latin1_corpus_is_refused_with_its_encoding_and_the_fix(tmp_path, tok, paragraphs):
    raw = tmp_path / "raw"
    for i in range(8):
        write(raw / f"fr{i}.txt", "\n\n".join(FRENCH[i % 4 :] + FRENCH[: i % 4]).encode("cp1252"))
    for i in range(2):
        write(raw / f"en{i}.txt", paragraphs[i])
    cfg = make_cfg(tmp_path / "data", [one("fr", {"path": str(raw)})], tok)
    with pytest.raises(ValueError) as caught:
        prepare_all(cfg)
    msg = str(caught.value)
    assert "'fr' would lose 8 of its 10 documents that hold text (80.0%: invalid_utf8=8)" in msg
    assert f"{raw / 'fr0.txt'} (line 1, byte 4), {raw / 'fr1.txt'} (line 1, byte 0), " in msg
    assert "are not UTF-8 and look like cp1252; convert each in place with `iconv -f CP1252" in msg
    assert "look like cp1252; convert each" in msg and "Only the first 5 files" in msg
    assert "data.max_skipped_fraction=0.8 to prepare the dataset without them" in msg
    assert "\n" not in msg and not cfg.dataset_dir("fr").exists()
    # accepted knowingly
    (man,) = prepare_all(make_cfg(tmp_path / "data", [one("fr", {"path": str(raw)})], tok,
                                  max_skipped_fraction=0.8))  # fmt: skip
    assert man["skipped"]["invalid_utf8"] == 8 and man["documents"]["usable"] == 2


def test_few_skipped_documents_are_a_warning_naming_the_file(tmp_path, tok, paragraphs, caplog):
    for i in range(20):
        write(tmp_path / "raw" / f"{i:02d}.txt", paragraphs[i])
    bad = write(tmp_path / "raw" / "99.txt", "\n\n".join(FRENCH).encode("cp1252"))
    write(tmp_path / "raw" / "blank.txt", " \n")  # empty: not counted against the threshold
    cfg = make_cfg(tmp_path / "data", [one("u", {"path": str(tmp_path / "raw")})], tok)
    with caplog.at_level(logging.WARNING, logger="trainer.data.prepare"):
        (man,) = prepare_all(cfg)
    assert man["skipped"]["invalid_utf8"] == 1 and man["skipped"]["empty"] == 1
    assert "1 of 21 documents that hold text skipped (4.8%: invalid_utf8=1)" in caplog.text
    assert f"{bad} (line 1, byte 4) is not UTF-8 and looks like cp1252" in caplog.text
    assert f"`iconv -f CP1252 -t UTF-8 {bad} > {bad}.utf8 && mv {bad}.utf8 {bad}`" in caplog.text


def test_files_that_are_not_utf8_are_found_and_described(tmp_path):
    text = "first line is plain\nsecond too\n" + "\n".join(FRENCH) + "\n"
    f = write(tmp_path / "fr.txt", text.encode("cp1252"))
    offset = text.encode("cp1252").index("œ".encode("cp1252"))
    found = find_not_utf8(f)
    assert found == NotUtf8(f, 3, offset, "cp1252")
    assert describe_not_utf8([found]) == [
        f"{f} (line 3, byte {offset}) is not UTF-8 and looks like cp1252; convert it in place "
        f"with `iconv -f CP1252 -t UTF-8 {f} > {f}.utf8 && mv {f}.utf8 {f}`"
    ]
    binary = NotUtf8(tmp_path / "b.bin", 1, 0, None)
    assert describe_not_utf8([binary, found, found]) == [
        f"{binary.path} (line 1, byte 0) is not UTF-8 and no text encoding fits it: remove it if "
        f"not text",
        f"{f} (line 3, byte {offset}), {f} (line 3, byte {offset}) are not UTF-8 and look like "
        f"cp1252; convert each in place with `iconv -f CP1252 -t UTF-8 FILE > FILE.utf8 && mv "
        f"FILE.utf8 FILE`",
    ]
    assert find_not_utf8(write(tmp_path / "ok.txt", text)) is None
    # a UTF-8 character cut by the reader's chunk boundary is not a bad byte
    assert find_not_utf8(write(tmp_path / "big.txt", "x" + "é" * (5 << 20))) is None


@pytest.mark.parametrize(
    ("encoding", "text", "want"),
    [
        ("latin-1", "Größe und Übermaß, schöne Grüße aus München; Ärger über Öl.", "cp1252"),
        ("latin-1", "El niño comió piña en el año de la canción más célebre.", "cp1252"),
        ("cp1251", "Привет, как дела? Это тестовый текст на русском языке.", "cp1251"),
        ("cp1250", "Zażółć gęślą jaźń, w Łodzi pada śnieg i wieje wiatr.", "cp1250"),
        ("shift_jis", "これは日本語のテキストです。東京は大きな都市です。", "cp932"),
    ],
)
def test_guess_encoding(tmp_path, encoding, text, want):
    f = write(tmp_path / "x.txt", ((text + "\n") * 5).encode(encoding))
    assert guess_encoding(f) == want
    assert iconv_name(want) == want.upper()
    assert guess_encoding(write(tmp_path / "b.bin", bytes(range(256)) * 4)) is None
