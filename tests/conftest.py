"""Shared pytest setup: the `gpu` and `slow` markers and automatic skipping of GPU tests.

Nothing heavy is imported here: CuPy is imported only when a collected test is marked `gpu`,
torch never.
"""

import sys
from functools import lru_cache

import pytest


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device; any failure means no GPU."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and CuPy; skipped automatically without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    # Timing-based checks are noise on small, shared CI machines.
    settings.register_profile("cupyq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("cupyq")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (none found)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def no_cupy(monkeypatch):
    """Make ``import cupy`` (and cupyx, cupy_backends) fail as on a machine without CuPy, for one test.

    torch is imported first where installed: its first import inspects loaded modules, which would trip over
    the hidden ones.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    for name in ("cupy", "cupyx", "cupy_backends"):
        monkeypatch.setitem(sys.modules, name, None)
