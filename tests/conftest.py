"""Fixtures shared by the test modules; the builders they use: helpers.py."""
import io
import os
import signal
import types
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
from data import backbones, shapes, shapes_chat
from lavin import save_adapters
from model import Tokenizer
from runtime import cpu_threads
from tests.formats import write_meta
from tests.helpers import N, content_tokens, scripted_lavin, train_tokenizer, write_chat_run, write_release


def pytest_configure(config):
    """The tests run on the threads the entry points choose (runtime.cpu_threads). A suite started
    as a background job (`python -m pytest &`) inherits SIGINT ignored, and so would every child
    it starts, which then could not be stopped by the SIGINT the tests send: Python's own handler
    back here, and a child, after exec, starts with the default action. A child that dies of a
    signal (an abort at exit, a segfault) prints every thread's Python stack (PYTHONFAULTHANDLER),
    so the failure it causes says where."""
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    cpu_threads(torch.device("cpu"))
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    """demo.py's tests: a chat run over the shipped tiny Vicuna and CLIP (tests/helpers.py), its
    Demo, and the server serving it on a free port, in a thread of this process."""
    import threading
    import types

    import demo
    from data import shapes_chat

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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A shapes set (problems, images, tokenizer), the scripted model, and the same model as files:
    a LLaMA folder in Meta's layout, a CLIP checkpoint and a train.py-style run folder."""
    root = tmp_path_factory.mktemp("sample")
    problems = shapes.write_problems(root, 60, seed=0)
    texts = ["".join(shapes.problem_text(p)) for p in problems.values()]
    backbones.train_tokenizer(texts + ["Image: N/A", "Image: ", "Instruction: Response:"], root / "tokenizer.model")
    tok = Tokenizer(root / "tokenizer.model")
    model = scripted_lavin(tok, content_tokens(tok, [shapes.problem_text(p)[0] for p in problems.values()]))
    llama_state = {k: v for k, v in model.llama.state_dict().items() if "adapter" not in k}
    a = model.llama.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=-1, multiple_of=a.multiple_of,
                  norm_eps=a.norm_eps)
    write_meta(root / "llama", params, llama_state)  # tokenizer.model sits in its parent
    (root / "clip").mkdir()
    torch.save({f"visual.{k}": v for k, v in model.visual.state_dict().items() if "adapter" not in k},
               root / "clip" / "tiny.pt")
    run = root / "run"
    run.mkdir()
    config = dict(dataset="shapes", llama_path=str(root / "llama"), clip_path=str(root / "clip" / "tiny.pt"),
                  data_path=str(root), prompt_format="QCM-ALE", max_seq_len=256, image_mode="lavin")
    save_adapters(run / "adapters.pth", model, config=config, step=1)
    task = data.evaluation("shapes", str(root), "test", tok, resolution=32)
    return types.SimpleNamespace(root=root, tok=tok, model=model, run=run, task=task, ds=task.dataset, problems=problems)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def shapes_tok():
    """The tokenizer of the shipped shapes backbones (data/shapes_backbones)."""
    from data import shapes

    return Tokenizer(shapes.BACKBONES / "tokenizer.model")


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory):
    return shapes_chat.generate(tmp_path_factory.mktemp("chat") / "shapes-chat", pictures=24, quiet=True)


@pytest.fixture(scope="module")
def full_small(tmp_path_factory) -> Path:
    """A complete set with the shipped backbones, made the way build_dataset makes it on first use."""
    root = tmp_path_factory.mktemp("shapes_full") / "set"
    assert shapes.ensure(root, n_problems=N, seed=0, quiet=True) == root
    return root


# ----------------------------------------------------------------------------- a mini ScienceQA release

CORPUS = """Question: Which material is this?
Context: Look at the picture. A window.
Options: (A) wood (B) glass (C) rubber
Response:The answer is B. BECAUSE: A material is a type of matter. Glass is clear.
Instruction: Give three tips about sleep. Describe the image. What color? How many?
The cat is blue. A red square. Red. Two. Tom has a dog. Who has a dog? What color is the square?
Colors are everywhere. Look closely. The square is red. The picture shows a map.
Which word is a noun? Natural science, social science and language science."""


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A real sentencepiece model with LLaMA's settings that matter here: ids unk 0, BOS 1,
    EOS 2; identity normalisation and no whitespace collapsing, so newlines and double spaces
    survive a round trip (byte fallback covers characters it has not seen)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=buf, vocab_size=400,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer(path)


@pytest.fixture
def sqa(tmp_path):
    return write_release(tmp_path / "scienceqa")
