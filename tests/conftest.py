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


# --------------------------------------------------------------------------- the tiny model

TINY_CACHE = "runs/.tiny-ip2p"  # the presets' default `model.tiny_dir`, shared with `make demo`


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The seeded tiny InstructPix2Pix saved with `save_pretrained` (built once, then reused)."""
    from sampler.models import resolve_pretrained

    return resolve_pretrained("tiny", TINY_CACHE, seed=0)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """`tiny_config(*overrides)`: configs/tiny.yaml, quiet, writing runs under tmp_path."""
    from trainer.config import load_config

    def make(*overrides: str):
        base = [f"run.output_dir={tmp_path / 'runs'}", "run.quiet=true", f"model.tiny_dir={TINY_CACHE}"]
        return load_config("configs/tiny.yaml", [*base, *overrides])

    return make
