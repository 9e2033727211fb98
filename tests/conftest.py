"""Shared test set-up: every test starts from the same RNG state and a small thread count."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
