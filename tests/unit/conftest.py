"""Fixtures for the unit tests."""

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No EMB_PROVIDER_* from the developer's shell and no .env of the checkout leak into a test; the
    working directory is an empty folder of its own (returned), where a test may write a .env."""
    for name in list(os.environ):
        if name.upper().startswith("EMB_PROVIDER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
