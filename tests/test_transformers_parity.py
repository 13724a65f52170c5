"""The Hugging Face layouts against Hugging Face's own models, where transformers is installed:
LlamaForCausalLM (LLaMA-3.1's shape: GQA, rope_theta 500000, llama3 RoPE scaling; and a tied head
as LLaMA-3.2-1B has), MistralForCausalLM, and CLIPVisionModelWithProjection read the same files as
model.load_llama and clip.load_clip."""
import pytest
import torch

import clip
from model import Tokenizer, load_llama
from tests.formats import write_hf, write_hf_clip
from tests.helpers import edit_json, random_state, tiny_args

transformers = pytest.importorskip("transformers", reason="transformers is not installed: no parity check "
                                                          "against Hugging Face's own models")
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 1024}


def hf_logits(folder, cls, tokens):
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", ["llama3.1", "llama3.2-tied", "mistral"])
def test_logits_equal_transformers(kind, tmp_path, tokenizer_path):
    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words, rope_theta=1e6 if kind == "mistral" else 500000.0,
                     use_scaled_rope=kind != "mistral", rope_original_context=1024)
    state = random_state(args, seed=2)
    if kind == "llama3.2-tied":
        state["output.weight"] = state["tok_embeddings.weight"]
    write_hf(tmp_path, args, {k: v for k, v in state.items() if not (kind == "llama3.2-tied" and k == "output.weight")})
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    extra = dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096) \
        if kind == "mistral" else dict(rope_scaling=LLAMA31, tie_word_embeddings=kind == "llama3.2-tied")
    edit_json(tmp_path / "config.json", lambda c: c.update(extra))
    ours, _ = load_llama(tmp_path, max_seq_len=64)
    tokens = torch.randint(0, args.vocab_size, (2, 40))  # past 1024 / 4 / ... : every RoPE band is exercised
    cls = transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM
    want = hf_logits(tmp_path, cls, tokens)
    with torch.no_grad():
        got = ours(tokens)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_clip_features_equal_transformers(tmp_path):
    """Our [CLS] after every second block is transformers' hidden state of that layer; the image
    embedding is its image_embeds."""
    torch.manual_seed(0)
    vit = clip.VisionTransformer(resolution=32, patch_size=8, width=128, layers=4, output_dim=16).eval()
    write_hf_clip(tmp_path / "hf", vit, "bin")
    ours = clip.load_clip(tmp_path / "hf")
    theirs = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(pixel_values=images, output_hidden_states=True)
        got = ours(images, every=2)
        for j, layer in enumerate((2, 4)):
            assert (got[:, j] - out.hidden_states[layer][:, 0]).abs().max() < 1e-4
        assert (ours.encode_image(images) - out.image_embeds).abs().max() < 1e-4
