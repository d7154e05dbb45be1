import os
import sys

# the format tests import tests/reference.py as `reference`, whatever pytest's import mode
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the suite: results are identical, and on a busy 2-core machine
    torch's second OpenMP thread spins waiting for a core and makes tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
