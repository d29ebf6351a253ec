"""The demo model and adapters every end-to-end test serves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo():
    """The shipped demo (or ``QUIVER_TEST_DEMO_DIR``, or one built in the user cache).

    Building the demo takes CPU minutes, far too long for a test: without a built demo the
    tests fail and say how to build it.
    """
    from quiver.backend.demo import ASSETS, load_demo

    override = os.environ.get("QUIVER_TEST_DEMO_DIR")
    candidates = [Path(override)] if override else \
        [ASSETS, Path.home() / ".cache" / "quiver" / "demo"]
    for root in candidates:
        try:
            return load_demo(root)
        except FileNotFoundError:
            continue
    pytest.fail(f"no built demo in {[str(c) for c in candidates]}; build one with "
                "`python -m quiver.backend.demo.build DIR` and set QUIVER_TEST_DEMO_DIR=DIR",
                pytrace=False)
