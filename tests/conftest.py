import torch

from runtime import cpu_threads


def pytest_configure(config):
    """The tests run on the threads the entry points choose (runtime.cpu_threads)."""
    cpu_threads(torch.device("cpu"))
