"""Shared fixtures of the vision tests: the digits at 16x16 and the digits classifier, trained
once per test session into a temporary cache (about 20 s)."""

from __future__ import annotations

import pytest

from genforge.vision.classifier import digits_classifier
from genforge.vision.data import load_digits


@pytest.fixture(scope="session")
def digits16():
    return load_digits(16)


@pytest.fixture(scope="session")
def classifier16(tmp_path_factory):
    return digits_classifier(16, cache_dir=tmp_path_factory.mktemp("vision_cache"))
