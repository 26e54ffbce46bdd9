import pytest
import torch


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Training with threads=N sets torch's thread count for the process; give every test the default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
