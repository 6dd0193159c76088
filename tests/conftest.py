"""Fixtures the tests share; shared helper functions live in the *_fixtures.py modules beside this file."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny shapes: threads only add overhead, and the CPU is shared; a module opts in with ``pytestmark``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The runtime's toy bundle (tests/runtime_fixtures.py) at S = 64."""
    from runtime_fixtures import make_toy_bundle

    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy", resolution=64)
