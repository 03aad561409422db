"""Shared pytest options: tests marked `weights` or `gpu` are skipped unless asked for."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-weights", action="store_true", help="run tests that need real pretrained weights")
    parser.addoption("--run-gpu", action="store_true", help="run tests that need a CUDA device")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("weights", "--run-weights"), ("gpu", "--run-gpu")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"needs {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
