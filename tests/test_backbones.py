"""data/backbones.py: the tiny backbones, built reproducibly; the shipped ones read text and captions but
not pixels, and load with the project's own loaders."""
from pathlib import Path

import pytest

from data import backbones, shapes, shapes_chat
from tests.helpers import file_bytes, read


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory) -> Path:
    """data/backbones.py's whole recipe with a handful of steps."""
    out = tmp_path_factory.mktemp("backbones") / "bb"
    backbones.build(out, seed=0, lm_steps=3, clip_steps=2, quiet=True, vicuna_steps=2, vicuna_eval=6)
    return out


def test_backbone_build_is_reproducible(tiny_backbones, tmp_path):
    """Tokenizer and both sets of weights, byte for byte (same machine, same thread count)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1234)  # the caller's random state must neither matter nor change
    state = torch.random.get_rng_state()
    backbones.build(tmp_path / "again", seed=0, lm_steps=3, clip_steps=2, quiet=True, vicuna_steps=2,
                    vicuna_eval=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert file_bytes(tmp_path / "again") == file_bytes(tiny_backbones)
    assert set(file_bytes(tiny_backbones)) == set(shapes.BACKBONE_FILES) | set(shapes_chat.BACKBONE_FILES)


def test_shipped_llama_reads_text_and_captions_but_not_pixels():
    """The shipped tiny LLaMA answers text problems and image problems given their caption in the
    "Image: " slot, and is near chance given LaVIN's "Image: N/A": only the visual path can help."""
    model_py = pytest.importorskip("model")
    llama, tok = model_py.load_llama(shapes.BACKBONES / "llama")
    held_out = backbones.lm_corpus(270, seed=5)  # a stream neither the LLaMA nor the set has seen
    text = [(p, None) for p, c in held_out if not c]
    image = [(p, c) for p, c in held_out if c]
    assert backbones.answer_accuracy(llama, tok, text) >= 0.8
    assert backbones.answer_accuracy(llama, tok, image) >= 0.8
    assert backbones.answer_accuracy(llama, tok, [(p, None) for p, _ in image]) <= 0.5  # chance ~0.3


def test_shipped_vicuna_follows_instructions_and_reads_captions_not_pixels():
    """The shipped tiny Vicuna answers held-out text instructions and questions about a picture
    given its caption, in the chatbot's template; given "Image: N/A" it cannot know the picture."""
    model_py = pytest.importorskip("model")
    vicuna, tok = model_py.load_llama(shapes.BACKBONES / "vicuna")
    held_out = [(c, *turns[0]) for c, turns in backbones.chat_corpus(120, seed=5)]
    text = [x for x in held_out if x[0] is None]
    image = [x for x in held_out if x[0] is not None]
    assert backbones.chat_accuracy(vicuna, tok, text) >= 0.9
    assert backbones.chat_accuracy(vicuna, tok, image) >= 0.75
    assert backbones.chat_accuracy(vicuna, tok, [(None, p, a) for _, p, a in image]) <= 0.3


@pytest.mark.parametrize("where", ["shipped", "built"])
def test_backbones_load_with_the_project_loaders(where, full_small, tiny_backbones):
    torch = pytest.importorskip("torch")
    model_py, clip_py = pytest.importorskip("model"), pytest.importorskip("clip")
    folder = full_small if where == "shipped" else tiny_backbones
    llama, tok = model_py.load_llama(folder / "llama")  # tokenizer.model from the parent folder
    assert (tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (1, 2, 0, -1)
    assert 300 <= tok.n_words <= 1000
    weird = "Ünïcode ☃ {braces} \\n"  # byte fallback: everything encodes and comes back
    assert tok.decode(tok.encode(weird, bos=False, eos=False)) == weird
    ids = tok.encode("Question: What color is the shape?", bos=True, eos=False)
    assert llama(torch.tensor([ids])).shape == (1, len(ids), tok.n_words)
    state = torch.load(folder / "llama" / "consolidated.00.pth", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}  # as Meta ships them
    vit = clip_py.load_clip(folder / "clip" / "ViT-tiny.pt")
    state = torch.load(folder / "clip" / "ViT-tiny.pt", weights_only=True)
    assert all(k.startswith("visual.") for k in state) and "visual.conv1.weight" in state
    assert {v.dtype for v in state.values()} == {torch.float16}  # as OpenAI ships them
    pid = next(iter(read(full_small, "captions.json")["captions"]))
    split = read(full_small, "problems.json")[pid]["split"]
    x = clip_py.preprocess(full_small / "images" / split / pid / "image.png", "lavin", vit.resolution)
    assert vit(x[None], every=4).shape == (1, 3, 64)
    summary = read(folder, "backbones.json")
    assert 0 <= summary["llama_acc_text"] <= 1 and set(summary["clip_acc"]) == set(backbones.CLIP_TASKS)
