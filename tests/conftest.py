from pathlib import Path

import pytest
import torch

from runtime import cpu_threads


def pytest_configure(config):
    """The tests run on the threads the entry points choose (runtime.cpu_threads)."""
    cpu_threads(torch.device("cpu"))


@pytest.fixture(autouse=True)
def keep_threads():
    """A test that runs an entry point in this process (a laptop preset takes 1 thread) leaves
    the next test the threads it found."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """A 60-problem shapes set in ScienceQA's layout, one per test module (the training tests)."""
    from data import shapes

    return shapes.ensure(tmp_path_factory.mktemp("train") / "shapes", n_problems=60, seed=0, quiet=True)
