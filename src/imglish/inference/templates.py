"""Prompt templates of zero-shot classification: each holds one ``{}`` where the class name goes.

The bundled set is short on purpose (eight prompts in plain words, our own); pass ``templates=`` (or
``--templates FILE``, one per line) for a dataset's own set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from imglish.inference.inputs import InputError

__all__ = ["DEFAULT_TEMPLATES", "check_templates", "load_templates"]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a small {}.",
    "a large {}.",
    "{}",
)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; each must be a string with exactly one ``{}``."""
    if isinstance(templates, str):
        templates = [templates]
    out = list(templates)
    if not out:
        raise InputError("templates must not be empty")
    for t in out:
        rest = t.replace("{}", "", 1) if isinstance(t, str) else ""
        if not isinstance(t, str) or t.count("{}") != 1 or "{" in rest or "}" in rest:
            raise InputError(f"template {t!r} must hold exactly one '{{}}' where the class name goes")
    return out


def load_templates(path: str | os.PathLike) -> list[str]:
    """One template per non-blank line of a text file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"templates file {str(p)!r} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"templates file {str(p)!r} is empty")
    return check_templates(lines)
