"""One place holds the version: the installed distribution's metadata and ``imglish --version`` read
``imglish.__version__``."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

import imglish
from imglish.cli.main import main


def test_the_version_has_one_source(capsys):
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", imglish.__version__)
    assert importlib.metadata.version("imglish") == imglish.__version__
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"imglish {imglish.__version__}"
