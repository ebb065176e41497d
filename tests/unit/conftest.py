"""Fixtures shared by the unit tests."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared 2-core box they only spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
