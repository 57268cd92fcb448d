"""Shared fixtures (plain helpers are in ``helpers.py``) and the test tiers.

Tiers, by marker (registered in ``pyproject.toml``): plain ``python -m pytest`` runs the fast tier, the
tests marked neither ``slow`` (the real demo model) nor ``e2e`` (subprocess CLI runs, torchrun, kill and
resume, offload, training, and anything else that takes more than a few seconds); ``scripts/test.sh`` runs
every tier.
"""
from __future__ import annotations

import shutil

import pytest

from helpers import FAMILIES, build_tiny_model, down_proj_stats, make_text


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(make_text())
    return p


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_text):
    """``{family: folder}`` of tiny random models, built once per session."""
    root = tmp_path_factory.mktemp("models")
    text = tiny_text.read_text()
    return {f: build_tiny_model(f, root / f, text) for f in FAMILIES}


@pytest.fixture
def broken(ckpt, tmp_path):
    """A writable copy of the test module's own ``ckpt`` fixture, for tests that damage a checkpoint."""
    dst = tmp_path / "broken"
    shutil.copytree(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def captured(tiny_models, tiny_text):
    """``(W, H)`` of the tiny llama's block-1 down_proj, ``H`` from the inputs it really sees on the text."""
    return down_proj_stats(tiny_models["llama"], tiny_text.read_text())
