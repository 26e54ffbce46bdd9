import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Training with threads=N sets torch's thread count for the process; give every test the default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A small folder of pseudo-English text files, enough for a 30% by-file validation split."""
    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = "the a river stone quick light over under runs falls green old town and of to".split()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + "\n")
    return folder
