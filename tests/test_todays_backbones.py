"""LaVIN on today's backbones, end to end on the laptop: a tiny LLaMA-3.1 in Hugging Face's layout
(config.json with grouped-query attention and llama3 RoPE scaling, its weights, tokenizer.json with
the ranks trained here on the set's text) and the shapes set's tiny CLIP in Hugging Face's layout,
trained with train.py's recipe for an epoch and evaluated, its prompts framed by LLaMA-3's own BOS
and EOS."""
import json

import pytest
import torch

import clip
import data
import tokenizer
from lavin import IGNORE_INDEX
from tests.formats import train_ranks, write_hf, write_hf_clip, write_tokenizer_json
from tests.helpers import edit_json, losses, random_state, run_cli, tiny_args

pytest.importorskip("regex", reason="LLaMA-3's tokenizer needs the regex package")


@pytest.fixture(scope="module")
def world(tiny_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    problems = json.loads((tiny_set / "problems.json").read_text())
    text = " ".join(f"{p['question']} {p['hint']} {' '.join(p['choices'])} The answer is ABCDE." for p in problems.values())
    ranks = train_ranks(n_merges=200, text=text)
    base = len(ranks)
    special = {base + i: f"<|reserved_special_token_{i}|>" for i in range(256)}
    special.update({base: "<|begin_of_text|>", base + 1: "<|end_of_text|>", base + 9: "<|eot_id|>"})
    llama = root / "llama3"
    args = tiny_args(vocab_size=base + 256, rope_theta=500000.0, use_scaled_rope=True)
    write_hf(llama, args, random_state(args, seed=5))
    edit_json(llama / "config.json", lambda c: c.update(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    write_tokenizer_json(llama / "tokenizer.json", ranks, special)
    write_hf_clip(root / "clip-hf", clip.load_clip(tiny_set / "clip" / "ViT-tiny.pt"), fmt="bin")
    return tiny_set, llama, root


def train(world, out, clip_path):
    tiny_set, llama, _ = world
    r = run_cli("--dataset", "shapes", "--data_path", str(tiny_set), "--llama_path", str(llama), "--clip_path",
                str(clip_path), "--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
                "--effective_batch", "8", "--eval_batch_size", "18", "--blr", "0.5", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_prompts_begin_and_end_with_llama3s_own_tokens(world):
    """Each sample: <|begin_of_text|> first, the loss on the answer only, the answer closed by
    <|end_of_text|>: the ids of the tokenizer.json, not sentencepiece's 1 and 2."""
    tiny_set, llama, _ = world
    tok = tokenizer.load_tokenizer(llama / "tokenizer.json")
    ds = data.build_dataset("shapes", str(tiny_set), "train", tok, prompt_format="QCM-A", max_seq_len=256)
    assert tok.bos_id > 2 and tok.eos_id == tok.bos_id + 1
    for sample, tokens, labels in zip(ds.samples, ds.tokens, ds.labels):
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        target = [int(t) for t, y in zip(tokens, labels) if y != IGNORE_INDEX]
        assert target[-1] == tok.eos_id and tok.decode(target[:-1]) == sample.turns[0][1]


def test_lavin_trains_and_evaluates_on_llama3_and_hugging_faces_clip(world):
    """An epoch (3 optimizer steps) then the test split's evaluation (a random LLaMA answers
    nothing parseable: every problem counted as unparsed); the CLIP folder gives the losses and
    answers of the OpenAI archive it was converted from, bit for bit."""
    tiny_set, _, root = world
    r = train(world, root / "hf", root / "clip-hf")
    got = losses(root / "hf")
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got)))
    assert abs(got[0] - torch.log(torch.tensor(float(256 + 256 + 200))).item()) < 1  # a random LM's: about ln V
    assert got[-1] < got[0] - 0.3  # the adapters learn (the same steps each run: seed 0)
    result = json.loads((root / "hf" / "results.json").read_text())
    preds = json.loads((root / "hf" / "preds.json").read_text())
    test = json.loads((tiny_set / "pid_splits.json").read_text())["test"]
    assert sorted(preds) == sorted(test) and result["n"] == len(test) == 18 and "Avg" in r.stdout
    train(world, root / "openai", tiny_set / "clip" / "ViT-tiny.pt")
    assert losses(root / "openai") == got
    assert json.loads((root / "openai" / "preds.json").read_text()) == preds
    assert json.loads((root / "openai" / "results.json").read_text()) == result
