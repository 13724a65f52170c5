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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """demo.py's tests: a chat run over the shipped tiny Vicuna and CLIP (tests/checkpoints.py), its
    Demo, and the server serving it on a free port, in a thread of this process."""
    import threading
    import types

    import demo
    from data import shapes_chat
    from tests.checkpoints import write_chat_run

    root = tmp_path_factory.mktemp("demo")
    run = write_chat_run(root / "run", shapes_chat.generate(root / "chat", pictures=8, quiet=True))
    d = demo.load(demo.DemoConfig(run=str(run), examples=4))
    server = demo.make_server(d, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    picture, question = d.examples[0]
    yield types.SimpleNamespace(run=run, demo=d, port=server.server_address[1], picture=picture, question=question)
    server.shutdown()
    server.server_close()
