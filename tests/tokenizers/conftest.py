"""Fixtures for the tokenizer tests: a small SentencePiece model trained on a corpus written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

# Training text: several scripts, so the model has pieces for each (rarer characters stay unknown).
TRAIN_LINES = [
    "a red circle is to the left of a small blue square",
    "two green triangles sit above the yellow ball on the grass",
    "the large purple cube is next to three tiny spheres",
    "Le café est très animé ce matin, dit l'élève à l'hôtel.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "El niño comió piña y jalapeños en la mañana.",
    "東京の猫は青い箱の上で眠っている。",
    "北京的天气今天很好，我们去公园吧。",
    "서울에서 고양이가 빨간 공을 가지고 놀아요.",
    "مرحبا بالعالم، القطة تجلس على الطاولة.",
    "שלום עולם, החתול יושב על השולחן.",
    "Привет, мир! Кошка сидит на столе.",
    "नमस्ते दुनिया, बिल्ली मेज़ पर बैठी है।",
    "I love pizza 🍕 and cats 🐱 and rockets 🚀!",
    "Numbers like 3.14159, 2,718 and 1e-9 appear in text too.",
]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    # Repeat with small variations so the unigram trainer has counts to work with.
    lines = [f"{line} {i % 7}" if i % 3 else line for i in range(40) for line in TRAIN_LINES]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_sentencepiece([corpus], vocab_size=200, output=folder / "test.model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(spm_model: Path) -> TextTokenizer:
    return TextTokenizer(spm_model)
