"""The text tokenizer reproduces XLMRobertaTokenizer's ids, and builds official-style batches."""

from __future__ import annotations

import pytest
import torch

from imglish.cli.main import main
from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

transformers = pytest.importorskip("transformers")

# Strings chosen to stress normalisation, unknown characters, special-token handling and edge cases.
CORPUS = [
    "",
    " ",
    "   \t\n  ",
    "\u3000",  # ideographic space only
    "a red circle",
    "  leading and trailing spaces  ",
    "multiple    inner     spaces",
    "UPPER lower MiXeD",
    "Le café est très animé; l'élève à l'hôtel.",
    "cafe\u0301 with a combining accent",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ligature and ² superscript",
    "東京の猫は青い箱の上で眠っている。",
    "北京的天气今天很好",
    "서울에서 고양이가",
    "مرحبا بالعالم، القطة تجلس على الطاولة.",
    "שלום עולם",
    "mixed مرحبا and שלום inside English",
    "\u202eright-to-left override\u202c",
    "Привет, мир!",
    "नमस्ते दुनिया",
    "ภาษาไทย unseen script",
    "emoji 🍕🐱🚀 and unseen 🦄🧬",
    "family 👨\u200d👩\u200d👧 zwj sequence and flag 🇫🇷",
    "control\x00chars\x07in\x1bthe\x7ftext",
    "tab\tnew\nline\rreturn",
    "zero\u200bwidth\u200cjoiner\u200dchars\ufeff",
    "non\u00a0breaking\u00a0space",
    "a" * 500,
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 8,
    "".join(chr(0x4E00 + i) for i in range(200)),
    "hello <mask> world",
    "hello<mask>world",
    "  <mask>  spaced mask",
    "<s> literal specials </s> <pad> <unk>",
    "x<s>y</s>z",
    "<mas k> not a mask, <MASK> neither",
    "Numbers 3.14159, 2,718 and 1e-9",
    "punctuation!?…—–«»“”„",
    "\ud7ff\ue000 private use",
]


@pytest.fixture(scope="module")
def hf(spm_model):
    return transformers.XLMRobertaTokenizer(str(spm_model))


def test_special_ids_follow_xlmr(tokenizer, hf):
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3,
    )
    assert tokenizer.vocab_size == tokenizer.num_pieces + 2 == hf.vocab_size == len(hf)
    assert tokenizer.mask_token_id == tokenizer.num_pieces + 1 == hf.mask_token_id
    assert [hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id] == [0, 1, 2, 3]


@pytest.mark.parametrize("text", CORPUS, ids=[f"s{i}" for i in range(len(CORPUS))])
def test_ids_equal_slow_xlmr_tokenizer(tokenizer, hf, text):
    assert tokenizer.encode(text) == hf.encode(text)
    assert tokenizer.tokenize(text) == hf.tokenize(text)
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == hf.convert_tokens_to_ids(hf.tokenize(text))


def test_corpus_exercises_unknown_and_special_ids(tokenizer):
    every = [i for text in CORPUS for i in tokenizer.encode(text, add_special_tokens=False)]
    assert tokenizer.unk_token_id in every  # unseen scripts map to <unk>
    assert tokenizer.mask_token_id in every
    assert max(every) <= tokenizer.mask_token_id


def test_every_piece_is_shifted_by_one(tokenizer, hf, spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    for sp_id in range(3, sp.get_piece_size()):
        piece = sp.id_to_piece(sp_id)
        assert tokenizer.convert_tokens_to_ids(piece) == sp_id + 1 == hf.convert_tokens_to_ids(piece)
        assert tokenizer.convert_ids_to_tokens(sp_id + 1) == piece


def test_decode_round_trip_and_skips(tokenizer, hf):
    text = "a red circle is to the left of a small blue square"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)
    # unused embedding rows (beyond vocab_size) and special ids are skipped
    noisy = [0, *ids[1:-1], tokenizer.mask_token_id, tokenizer.vocab_size, tokenizer.vocab_size + 7, 1, 1, 2]
    assert tokenizer.decode(noisy) == text
    assert tokenizer.decode(torch.tensor(noisy)) == text
    assert tokenizer.batch_decode(torch.tensor([ids, ids])) == [text, text]


def test_batch_call_truncates_pads_and_masks(tokenizer):
    texts = ["a red circle", "two green triangles sit above the yellow ball on the grass " * 3]
    out = tokenizer(texts, max_length=16)
    ids, mask = out["input_ids"], out["padding_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape == (2, 16)
    short = tokenizer.encode(texts[0])
    assert ids[0, : len(short)].tolist() == short
    assert (ids[0, len(short):] == tokenizer.pad_token_id).all()
    assert mask[0].tolist() == [0] * len(short) + [1] * (16 - len(short))
    long_pieces = tokenizer.encode(texts[1], add_special_tokens=False)
    assert ids[1].tolist() == [0, *long_pieces[:14], 2]
    assert mask[1].sum() == 0
    longest = tokenizer(texts[:1], max_length=16, padding="longest")
    assert longest["input_ids"].shape == (1, len(short))
    as_lists = tokenizer(texts[0], max_length=8, return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and len(as_lists["input_ids"][0]) == 8


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_text_is_an_error_in_batches(tokenizer, bad):
    with pytest.raises(ValueError, match="text 1 of the batch .* has no tokens"):
        tokenizer(["fine caption", bad])
    out = tokenizer([bad], max_length=4, allow_empty=True)
    assert out["input_ids"].tolist() == [[0, 2, 1, 1]]


def test_bad_arguments_raise_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        tokenizer("x", max_length=1)
    with pytest.raises(ValueError, match="padding"):
        tokenizer("x", padding="nope")
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode(123)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        TextTokenizer(junk)


def test_tokenizer_travels_as_bytes(tokenizer, tmp_path):
    again = TextTokenizer(model_proto=tokenizer.model_proto)
    saved = TextTokenizer(tokenizer.save(tmp_path / "copy.model"))
    for text in CORPUS[:20]:
        assert again.encode(text) == saved.encode(text) == tokenizer.encode(text)


def test_cli_trains_a_model_with_the_same_conventions(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the {c} {s} is near the {s}" for c in ("red", "blue", "green") for s in (
        "cube", "ball", "cone")) * 20, encoding="utf-8")
    out = tmp_path / "new.model"
    assert main(["tokenizer", "train-text", "--input", str(corpus), "--vocab-size", "24", "--output", str(out),
                 "--seed", "0"]) == 0
    assert "24 pieces" in capsys.readouterr().out
    tok = TextTokenizer(out)
    hf = transformers.XLMRobertaTokenizer(str(out))
    assert tok.vocab_size == 26 and tok.mask_token_id == 25 == hf.mask_token_id
    for text in ("the red cube is near the ball", "unseen words ü 猫", "", "a <mask> b"):
        assert tok.encode(text) == hf.encode(text)


def test_training_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece([tmp_path / "missing.txt"], 10, tmp_path / "m.model")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab\n")
    with pytest.raises(ValueError, match="SentencePiece training"):
        train_sentencepiece([tiny], 5000, tmp_path / "m.model")
