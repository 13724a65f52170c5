"""sample.py: cached batched generation against plain recomputation, early-stopped evaluation (its
command line: test_sample_cli.py).

Two tiny models on a real sentencepiece tokenizer (trained on a small shapes set):
  random_lavin   random LLaMA + CLIP + adapters: every position, route and pixel changes its output
  scripted_lavin a LLaMA wired by hand to answer "The answer is X." (a bigram chain; the letter is
                 picked by uniform attention over the context's content, so it varies per problem)
"""
import copy
import dataclasses
import json
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
from clip import VisionTransformer
from data import backbones, shapes
from data.table import parse_answer
from lavin import LaVIN, LaVINArgs, save_adapters
from model import Llama, ModelArgs, Tokenizer
from router import IMAGE, TEXT
from evaluate import evaluate, evaluate_split
from generate import ContextTooLong, StaticDecoder, generate
from sample import SampleConfig, converse
from tests.checkpoints import random_state, write_meta

ROOT = Path(__file__).resolve().parents[1]


def finish(model, tok, seed=0, clip_layers=8, **lavin_args):
    """LaVIN around a LLaMA, with a tiny random CLIP and adapters that do something."""
    torch.manual_seed(seed)
    visual = VisionTransformer(resolution=32, patch_size=8, width=64, layers=clip_layers, output_dim=16)
    model = LaVIN(LaVINArgs(**lavin_args), model, visual, tok.encode("Image: ", bos=False, eos=False),
                  tok.encode("Image: N/A", bos=False, eos=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised up-projections and lukewarm routers would hide the routing
        for name, p in model.named_parameters():
            if "adapter" in name and (".conv_B." in name or ".conv_D." in name or ".expert_weights." in name):
                p.normal_(0, 0.5, generator=g)
    return model.eval()


def random_lavin(tok, seed=0, max_seq_len=256, n_layers=2, clip_layers=12, **lavin_args):
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=max_seq_len)
    llama = Llama(args)
    llama.load_state_dict(random_state(args, seed))
    # 3 visual tokens: "Image: " + 3 is one longer than "Image: N/A", so text rows end in padding
    return finish(llama, tok, seed, clip_layers, **lavin_args)


def scripted_lavin(tok, content, big=60.0, g=30.0, seed=3):
    """A LLaMA wired by hand. Embeddings: dims 0..63 for every token (the bigram), dims 64..127 only
    for `content` tokens (the words that differ between problems). Attention (q = k = 0: uniform)
    writes the mean content of the context into dims 128..191; the FFN is off. The output reads the
    bigram ":" -> "The" -> "▁answer" -> "▁is" -> "▁" -> A|B|C|D -> "." -> "▁" ..., D -> EOS, off dims
    0..63; the letters also read dims 128..191, which breaks their tie by the problem's content."""
    gen = torch.Generator().manual_seed(seed)
    V, D, H = tok.n_words, 192, 64
    args = ModelArgs(dim=D, n_layers=1, n_heads=4, vocab_size=V, multiple_of=32, max_seq_len=256)
    llama = Llama(args)
    sd = {k: (torch.ones_like(v) if k.endswith("norm.weight") else torch.zeros_like(v))
          for k, v in llama.state_dict().items()}
    E = torch.zeros(V, D)
    E[:, :H] = torch.randn(V, H, generator=gen)
    E[content, H:2 * H] = torch.randn(len(content), H, generator=gen)
    E *= D ** 0.5 / E.norm(dim=1, keepdim=True)  # RMS 1: RMSNorm leaves a lone embedding as it is
    sd["tok_embeddings.weight"] = E
    sd["layers.0.attention.wv.weight"][H:2 * H, H:2 * H] = torch.eye(H)
    sd["layers.0.attention.wo.weight"][2 * H:, H:2 * H] = torch.randn(H, H, generator=gen) / H ** 0.5
    W, piece = sd["output.weight"], tok.sp.piece_to_id

    def link(x, y):  # the logit of y is `big` right after x
        W[y, :H] += big * E[x, :H] / E[x, :H].pow(2).sum()

    chain = [piece(p) for p in (":", "The", "▁answer", "▁is", "▁")]
    for a, b in zip(chain, chain[1:]):
        link(a, b)
    for letter in "ABCD":
        link(piece("▁"), piece(letter))
        W[piece(letter), 2 * H:] = g * F.normalize(torch.randn(H, generator=gen), dim=0)
        link(piece(letter), tok.eos_id if letter == "D" else piece("."))
    link(piece("."), piece("▁"))
    llama.load_state_dict(sd)
    return finish(llama, tok, seed)


def content_tokens(tok, prompts):
    """Tokens found in fewer than a third of the prompts: what tells one problem from another."""
    seen = Counter(t for p in prompts for t in set(tok.encode(p, bos=False, eos=False)))
    return sorted(t for t, n in seen.items() if n < len(prompts) / 3)


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


def rows(tok, seed=1, lengths=(5, 12, 3, 8)):
    """Prompts of different lengths (BOS + random ids), images, and an image/text mix."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[tok.bos_id] + torch.randint(3, tok.n_words, (n,), generator=g).tolist() for n in lengths]
    images = torch.randn(len(lengths), 3, 32, 32, generator=g)
    ind = torch.tensor([IMAGE, TEXT, IMAGE, TEXT][: len(lengths)])
    return prompts, images, ind


def eos_is(tok, eos):
    return types.SimpleNamespace(eos_id=eos, bos_id=tok.bos_id, decode=tok.decode)


# ----------------------------------------------------------------------------- generate

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


def test_top_p_keeps_the_nucleus():
    from generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.7, g)
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are never drawn
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert set(sample_next(logits, 1.0, 0.0, g).tolist()) == {0}  # the top token always stays
    assert sample_next(logits, 0.0, 0.7).eq(0).all()


# ----------------------------------------------------------------------------- evaluation

def test_early_stop_gives_the_full_decode_predictions_in_a_fifth_of_the_steps(world):
    full, early = {}, {}
    texts_full = evaluate(world.model, world.tok, world.task, batch_size=8, early_stop=False, stats=full, progress=False)
    texts = evaluate(world.model, world.tok, world.task, batch_size=8, early_stop=True, stats=early, progress=False)
    n = {pid: len(world.problems[pid]["choices"]) for pid in texts}
    preds = {pid: parse_answer(t, n[pid]) for pid, t in texts.items()}
    assert preds == {pid: parse_answer(t, n[pid]) for pid, t in texts_full.items()}
    assert len(set(preds.values())) >= 3  # two letters or more, and unparsed rows (D ends in EOS)
    assert all(t.startswith("The answer is ") for t in texts.values())
    assert early["row_steps"] / early["problems"] <= 64 / 5  # the reference decodes 64 tokens per problem
    assert full["row_steps"] > 4 * early["row_steps"]


def test_ranks_shard_the_split(world):
    whole = evaluate(world.model, world.tok, world.task, batch_size=4, progress=False)
    parts = [evaluate(world.model, world.tok, world.task, batch_size=4, rank=r, world_size=2, progress=False)
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and {**parts[0], **parts[1]} == whole
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_evaluate_split_writes_preds_results_and_prints_the_table(world, tmp_path, capsys):
    result = evaluate_split(world.model, world.tok, world.task, batch_size=16, output_dir=str(tmp_path), progress=False)
    preds = json.loads((tmp_path / "preds.json").read_text())
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text()) == result
    assert set(preds) == set(outputs) == {s.pid for s in world.ds.samples}
    assert preds == {pid: parse_answer(t, len(world.problems[pid]["choices"])) for pid, t in outputs.items()}
    assert result["unparsed"] == sum(p == -1 for p in preds.values()) > 0
    assert result["decode_steps_per_problem"] <= 64 / 5 and result["reference_steps_per_problem"] == 64
    shown = capsys.readouterr().out
    assert "NAT" in shown and "Avg" in shown and "decode steps per problem" in shown


def test_a_callers_smaller_max_new_tokens_wins_over_the_tasks_cap(world, tmp_path):
    """A task's own cap (MME's 20) bounds the caller's max_new_tokens, never raises it; and the
    model comes back in the mode it came in."""
    capped = types.SimpleNamespace(**{k: getattr(world.task, k) for k in ("name", "split", "dataset", "stop",
                                                                          "score", "table")}, max_new_tokens=5)
    model = random_lavin(world.tok, seed=2)
    for asked, budget in ((3, 3), (64, 5)):
        for training in (True, False):
            model.train(training)
            result = evaluate_split(model, world.tok, capped, output_dir=str(tmp_path / f"{asked}"),
                                    max_new_tokens=asked, early_stop=False, progress=False)
            assert model.training is training and all(m.training is training for m in model.modules())
        assert result["reference_steps_per_problem"] == budget
        assert result["decode_steps_per_problem"] == budget  # no early stop, no EOS: every row decodes the budget

