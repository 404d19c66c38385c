"""The fault-injection suite: everything in this folder, plus the faults that need another folder's cluster
fixtures (a GPU group, a Serve app on S3, a Ray job cluster), which carry `@pytest.mark.faults` where they
are. `pytest -m faults` runs all of them; CI runs them with the rest."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.faults)
