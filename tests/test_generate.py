"""generate.py: cached batched generation against plain recomputation, the fixed-shape decode step
(compiled too), stopping, sampling. The tiny models (helpers.py): random_lavin, and `world`'s scripted one."""
import copy
import dataclasses
import types

import pytest
import torch

from evaluate import evaluate
from generate import ContextTooLong, StaticDecoder, generate, prefill_embeddings, sample_next
from lavin import LaVINArgs, load_lavin
from router import IMAGE, TEXT
from sample import SampleConfig, converse
from tests.helpers import eos_is, random_lavin, rows


@pytest.mark.parametrize("visual", [True, False])  # False: the ablation inserts "Image: N/A" in every row
def test_cached_greedy_equals_uncached_recomputation(world, visual):
    model, tok = random_lavin(world.tok, visual=visual), eos_is(world.tok, -1)
    prompts, images, ind = rows(world.tok)
    out = generate(model, tok, prompts, images, ind, max_new_tokens=6)
    for b, p in enumerate(prompts):  # the whole sequence through LaVIN.forward, each step from scratch
        seq = list(p)  # a row with the shorter insertion ends in padding positions: skip them
        n_ins = len(model.prefix_img) + model.n_visual if ind[b] and visual else len(model.prefix_text)
        for _ in range(6):
            logits = model(torch.tensor([seq]), images[b:b + 1], ind[b:b + 1])
            seq.append(int(logits[0, len(seq) + n_ins - 1].argmax()))
        assert out[b] == seq[len(p):], b
    assert len({tuple(o) for o in out}) == len(out)


def test_batched_equals_one_by_one(world):
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, ind = rows(world.tok, seed=2, lengths=(9, 2, 14, 6))
    out = generate(model, tok, prompts, images, ind, max_new_tokens=5)
    for b in range(len(prompts)):
        assert generate(model, tok, prompts[b:b + 1], images[b:b + 1], ind[b:b + 1], max_new_tokens=5)[0] == out[b]


def test_folded_equals_unfolded(world):
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, ind = rows(world.tok, seed=3)
    for modality in (IMAGE, TEXT):
        keep = [b for b in range(len(prompts)) if ind[b] == modality]
        args = ([prompts[b] for b in keep], images[keep], ind[keep])
        want = generate(model, tok, *args, max_new_tokens=5)
        folded = copy.deepcopy(model).fold(modality)
        assert generate(folded, tok, *args, max_new_tokens=5) == want
        with pytest.raises(ValueError, match="folded"):
            generate(folded, tok, prompts, images, ind, max_new_tokens=2)


def test_text_rows_ignore_images_and_no_indicator_means_text(world):
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, _ = rows(world.tok, seed=4)
    text = torch.zeros(len(prompts), dtype=torch.long)
    want = generate(model, tok, prompts, None, None, max_new_tokens=5)
    assert generate(model, tok, prompts, images, text, max_new_tokens=5) == want
    assert generate(model, tok, prompts, torch.randn_like(images), text, max_new_tokens=5) == want
    assert generate(model, tok, prompts, images, torch.ones_like(text), max_new_tokens=5) != want


def test_a_padding_of_exactly_one(world):
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, _ = rows(world.tok, seed=7, lengths=(6, 5))
    ind = torch.tensor([TEXT, TEXT])
    _, pad, _ = prefill_embeddings(model, prompts, images, ind)
    assert pad.tolist() == [0, 1]
    out = generate(model, tok, prompts, images, ind, max_new_tokens=5)
    assert out[1] == generate(model, tok, prompts[1:], images[1:], ind[1:], max_new_tokens=5)[0]


def test_static_decode_step_gives_the_eager_tokens(world):
    """--compile's decode step, uncompiled: the whole cache under a mask, the slot as a tensor.
    Left-padded rows of different lengths, image and text routes; the decoder's cache, reused by
    a second batch of the same size, keeps nothing of the first; a folded model has no routes."""
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    decoder = StaticDecoder(model.llama, compile=False)
    steps, step = [], decoder.step
    decoder.step = lambda *args: steps.append(1) or step(*args)  # count the steps it takes
    for seed, lengths in ((1, (5, 12, 3, 8)), (7, (14, 2, 9, 4))):
        prompts, images, ind = rows(world.tok, seed=seed, lengths=lengths)
        want = generate(model, tok, prompts, images, ind, max_new_tokens=8)
        assert generate(model, tok, prompts, images, ind, max_new_tokens=8, decoder=decoder) == want
        with torch.inference_mode():  # the cache was made in generate's inference mode
            for t in [t for cache in decoder.caches.values() for t in cache.k + cache.v]:
                t.fill_(float("nan"))  # the next batch's reset must clear what this one left
    assert len(decoder.caches) == 1 and len(steps) == 2 * 7 and len(set(map(tuple, want))) == len(want)
    folded = copy.deepcopy(model).fold(IMAGE)
    keep = [0, 2]
    args = ([prompts[b] for b in keep], images[keep], ind[keep])
    assert generate(folded, tok, *args, max_new_tokens=8, decoder=StaticDecoder(folded.llama, compile=False)) == \
        [want[b] for b in keep]


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: a minute on a cold cache
def test_compiled_decode_gives_the_eager_tokens(world):
    """--compile for real (torch.compile; CUDA graphs need a GPU): generation, evaluation, chat."""
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, ind = rows(world.tok)
    want = generate(model, tok, prompts, images, ind, max_new_tokens=8)
    assert generate(model, tok, prompts, images, ind, max_new_tokens=8, decoder=StaticDecoder(model.llama)) == want
    kw = dict(batch_size=16, early_stop=False, max_new_tokens=16, progress=False)
    assert evaluate(world.model, world.tok, world.task, compile=True, **kw) == evaluate(world.model, world.tok, world.task, **kw)
    cfg = SampleConfig(template="instruction", max_new_tokens=6, fold=False)
    turns = ["What is in the picture?", "And its colour?"]
    image = torch.randn(3, 32, 32)
    assert converse(model, world.tok, dataclasses.replace(cfg, compile=True), image, turns) == \
        converse(model, world.tok, cfg, image, turns)


BACKBONES = "data/shapes_backbones"


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: a minute on a cold cache
def test_compiled_decode_at_4_bits_gives_the_eager_tokens():
    """sample.py --compile --bits 4: the fixed-shape decode step over NF4 weights, compiled, decodes
    the eager tokens (fp32 on the CPU), for image and text rows of different lengths."""
    from generate import StaticDecoder, generate

    torch.manual_seed(0)
    model, tok = load_lavin(f"{BACKBONES}/llama", f"{BACKBONES}/clip/ViT-tiny.pt", LaVINArgs(), bits=4, max_seq_len=96)
    model.eval()
    prompts = [tok.encode(p, bos=True, eos=False) for p in
               ("Question: Which color is the circle?\nOptions: (A) red (B) green\nAnswer:", "Question: What is 2+2?")]
    r = model.visual.resolution
    images = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(2))
    ind = torch.tensor([1, 0])
    want = generate(model, tok, prompts, images, ind, max_new_tokens=12)
    assert generate(model, tok, prompts, images, ind, max_new_tokens=12, decoder=StaticDecoder(model.llama)) == want


def test_each_row_stops_at_its_eos_and_the_batch_when_all_have(world):
    model = random_lavin(world.tok)
    prompts, images, ind = rows(world.tok, seed=5)
    free = generate(model, eos_is(world.tok, -1), prompts, images, ind, max_new_tokens=8)
    k = next(k for k in range(1, 8) if free[0][k] not in free[0][:k])
    eos = free[0][k]  # pretend this token is EOS: each row must end before its first occurrence
    stats = {}
    out = generate(model, eos_is(world.tok, eos), prompts, images, ind, max_new_tokens=8, stats=stats)
    cut = [o.index(eos) if eos in o else len(o) for o in free]
    assert out == [o[:c] for o, c in zip(free, cut)] and cut[0] == k and len(set(cut)) > 1
    assert stats["steps"] == min(8, max(c + 1 for c in cut))  # the EOS itself is a step
    stats = {}
    generate(model, eos_is(world.tok, -1), prompts, images, ind, max_new_tokens=8,
             stop=lambda b, ids: len(ids) == 3, stats=stats)
    assert stats["steps"] == 3  # every row stopped: the batch stopped


def test_a_row_ends_at_any_of_the_tokenizers_stop_ids(world):
    """LLaMA-3's chat models end a reply with <|eot_id|> as well as <|end_of_text|>: a row stops at
    the first of either."""
    model = random_lavin(world.tok)
    prompts, images, ind = rows(world.tok, seed=5)
    free = generate(model, eos_is(world.tok, -1), prompts, images, ind, max_new_tokens=8)
    a, b = free[0][1], next(t for t in free[1] if t != free[0][1])
    tok = types.SimpleNamespace(eos_id=a, stop_ids={a, b}, bos_id=world.tok.bos_id, decode=world.tok.decode)
    out = generate(model, tok, prompts, images, ind, max_new_tokens=8)
    cut = [min([o.index(t) for t in (a, b) if t in o] + [len(o)]) for o in free]
    assert out == [o[:c] for o, c in zip(free, cut)] and cut[0] <= 1 and cut[1] < len(free[1])


def test_stop_ends_only_its_own_row(world):
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, ind = rows(world.tok, seed=6)
    free = generate(model, tok, prompts, images, ind, max_new_tokens=6)
    seen = []
    out = generate(model, tok, prompts, images, ind, max_new_tokens=6, stop=lambda b, ids: b == 1 and len(ids) == 2,
                   on_token=lambda b, ids: seen.append((b, list(ids))))
    assert out == [free[0], free[1][:2], *free[2:]]
    for b in range(len(prompts)):  # on_token saw every token of every row, in order
        assert [ids for r, ids in seen if r == b] == [out[b][:k] for k in range(1, len(out[b]) + 1)]


def test_prompt_plus_new_tokens_longer_than_the_context_is_refused(world):
    model, tok = random_lavin(world.tok, max_seq_len=40), eos_is(world.tok, -1)
    prompt = [tok.bos_id] + [5] * (34 - len(model.prefix_text))  # + "Image: N/A" = 35 positions
    assert len(generate(model, tok, [prompt], max_new_tokens=5)[0]) == 5  # 40: just fits
    with pytest.raises(ContextTooLong, match="exceeds max_seq_len=40"):
        generate(model, tok, [prompt], max_new_tokens=6)


# ----------------------------------------------------------------------------- sampling

def test_top_p_keeps_the_nucleus():
    from generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.7, g)
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are never drawn
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert set(sample_next(logits, 1.0, 0.0, g).tolist()) == {0}  # the top token always stays
    assert sample_next(logits, 0.0, 0.7).eq(0).all()


def test_temperature_shapes_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    for t in (0.5, 2.0):
        draws = sample_next(logits, t, 1.0, g)
        freq = torch.bincount(draws, minlength=3).float() / len(draws)
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, -1), atol=0.015, rtol=0)
