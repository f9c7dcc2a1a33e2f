"""An autouse fixture that runs each test on one intra-op CPU thread.

A test module opts in with ``from .single_thread import one_cpu_thread  # noqa: F401``. At the
tiny sizes of these tests a second thread buys nothing and, on a busy 2-core machine, its
synchronisation made the suite several times slower (55 s against 290 s, measured).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
