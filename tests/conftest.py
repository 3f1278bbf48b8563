"""
pytest setup shared by every test module.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _trialTempDirectory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """
    Run the tests in a scratch directory: trial's C{mktemp} makes paths
    relative to the working directory, which would otherwise be the checkout.
    """
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(old)
