"""Guards against classes of bugs that once passed the whole suite when planted one at a time
(issue 15): each test runs the real path (a whole epoch, two real processes, a pad of exactly 1)
and asserts the value a user relies on."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import data
import evaluate
import train
from generate import ContextTooLong, generate, prefill_embeddings, sample_next
from router import IMAGE, TEXT, Router
from tests.test_lavin import tiny_lavin
from tests.test_sample import eos_is, random_lavin, rows
from tests.test_sample import world  # noqa: F401  (the fixture)
from tests.test_train import config
from train import TrainConfig, UsageError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the optimizer step

def test_adamw_has_the_papers_betas():
    opt = train.make_optimizer(tiny_lavin(), TrainConfig(), 1e-3, fused=False)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95), (0.9, 0.95)]


class InfLoss(nn.Module):
    """A 'model' whose summed loss overflows to +inf, as an fp16 step can."""

    def __init__(self):
        super().__init__()
        self.adapter_w = nn.Parameter(torch.ones(3, 2))

    def forward(self, tokens, images, img_indicator, labels, reduction="sum"):
        return (self.adapter_w * float("inf")).sum()


@pytest.mark.parametrize("weight", [float("inf"), float("nan")])
def test_an_inf_or_nan_loss_skips_the_step(weight):
    model = InfLoss()
    if weight != weight:  # NaN
        model.forward = lambda *a, **k: (model.adapter_w * float("nan")).sum()
    opt = train.make_optimizer(model, TrainConfig(), 1e-2, fused=False)
    batch = {"tokens": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
             "images": torch.zeros(1, 3, 4, 4), "img_indicator": torch.ones(1, dtype=torch.long)}
    loss = train.train_step(model, [batch], opt, None, torch.autocast("cpu", enabled=False), torch.device("cpu"), 1)
    assert not math.isfinite(loss)
    assert torch.equal(model.adapter_w, torch.ones(3, 2))  # no step: the weights are as they were, finite


# ----------------------------------------------------------------------------- the epoch loop

@pytest.fixture
def steps(monkeypatch):
    """Every train_step call's batch pids, and the model's mode, as the loop made them."""
    seen = []
    real = train.train_step

    def spy(ddp, micro, *args):
        seen.append(([pid for b in micro for pid in b["pids"]], ddp.training))
        return real(ddp, micro, *args)

    monkeypatch.setattr(train, "train_step", spy)
    return seen


def test_each_epoch_sees_every_sample_once_in_a_new_order(tiny_set, tmp_path, steps):
    train.main(config(tiny_set, tmp_path / "run", epochs=3))
    assert len(steps) == 9 and all(training for _, training in steps)  # in train mode: dropout on
    epochs = [[pid for pids, _ in steps[k:k + 3] for pid in pids] for k in (0, 3, 6)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == len(e) == 24 for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # set_epoch reshuffles


def test_a_checkpoint_at_every_epochs_end(tiny_set, tmp_path, monkeypatch):
    saved = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda run: (saved.append(run.step), real(run)))
    train.main(config(tiny_set, tmp_path / "run", epochs=3))
    assert saved == [3, 6, 9]


def test_grad_checkpointing_recomputes_every_block(tiny_set, tmp_path, monkeypatch):
    """With --grad_checkpointing each block runs twice per micro-batch (forward, then again in the
    backward pass): load_llama returns eval mode, so the loop must switch to train mode first.
    Counted at each block's attention (the block decides inside itself what to recompute)."""
    calls = []
    real = train.build_model

    def build(cfg, device, dtype):
        model, tok = real(cfg, device, dtype)
        for block in model.llama.layers:
            block.attention.register_forward_pre_hook(lambda m, args: calls.append(m))
        for block in model.visual.transformer.resblocks:
            block.attn.register_forward_pre_hook(lambda m, args: calls.append(m))
        return model, tok

    monkeypatch.setattr(train, "build_model", build)
    n_blocks = None
    for ckpt in (False, True):
        calls.clear()
        result = train.main(config(tiny_set, tmp_path / f"run{ckpt}", max_steps=1, grad_checkpointing=ckpt))
        model = result["model"]
        n_blocks = len(model.llama.layers) + len(model.visual.transformer.resblocks)
        # 2 micro-batches; the modality token's routing pass runs the LLaMA blocks once more each
        routing = 2 * len(model.llama.layers)
        assert len(calls) - routing == 2 * n_blocks * (2 if ckpt else 1), ckpt


def test_resume_refuses_another_number_of_epochs(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=1))
    with pytest.raises(UsageError, match="epochs=2, this run has epochs=3"):
        train.main(config(tiny_set, out, epochs=3, resume=str(out / "checkpoint.pth")))


# ----------------------------------------------------------------------------- images checked before the first step

def corrupt(root: Path, k: int) -> list[str]:
    """Truncate the images of the first k image problems of the train split; their pids."""
    problems = json.loads((root / "problems.json").read_text())
    pids = [p for p in json.loads((root / "pid_splits.json").read_text())["train"] if problems[p]["image"]][:k]
    for pid in pids:
        image = root / "images" / "train" / pid / "image.png"
        image.write_bytes(image.read_bytes()[:60])
    return pids


def test_each_rank_checks_its_own_share_of_the_images(tiny_set, tmp_path, world):  # noqa: F811
    root = tmp_path / "shapes"
    shutil.copytree(tiny_set, root)
    problems = json.loads((root / "problems.json").read_text())
    image_pids = [p for p in json.loads((root / "pid_splits.json").read_text())["train"] if problems[p]["image"]]
    image = root / "images" / "train" / image_pids[1] / "image.png"  # the second image: rank 1 of 2 checks it
    image.write_bytes(image.read_bytes()[:60])
    ds = data.build_dataset("shapes", str(root), "train", world.tok, resolution=32)
    assert train.check_images(ds, False, rank=0, world=2) == 0  # not rank 0's share
    with pytest.raises(UsageError, match=f"sample {image_pids[1]}"):
        train.check_images(ds, False, rank=1, world=2)


def test_skip_bad_images_drops_every_bad_sample(tiny_set, tmp_path, world):  # noqa: F811
    root = tmp_path / "shapes"
    shutil.copytree(tiny_set, root)
    bad = corrupt(root, 3)
    ds = data.build_dataset("shapes", str(root), "train", world.tok, resolution=32)
    n = len(ds)
    assert train.check_images(ds, True, rank=0, world=1) == 3
    assert len(ds) == len(ds.lengths) == n - 3 and not {s.pid for s in ds.samples} & set(bad)
    for i in range(len(ds)):  # every sample left loads
        ds[i]


# ----------------------------------------------------------------------------- generation and evaluation

def test_temperature_shapes_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    for t in (0.5, 2.0):
        draws = sample_next(logits, t, 1.0, g)
        freq = torch.bincount(draws, minlength=3).float() / len(draws)
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, -1), atol=0.015, rtol=0)


def test_a_padding_of_exactly_one(world):  # noqa: F811
    model, tok = random_lavin(world.tok), eos_is(world.tok, -1)
    prompts, images, _ = rows(world.tok, seed=7, lengths=(6, 5))
    ind = torch.tensor([TEXT, TEXT])
    _, pad, _ = prefill_embeddings(model, prompts, images, ind)
    assert pad.tolist() == [0, 1]
    out = generate(model, tok, prompts, images, ind, max_new_tokens=5)
    assert out[1] == generate(model, tok, prompts[1:], images[1:], ind[1:], max_new_tokens=5)[0]


class Prompts:
    """An evaluation task of given prompt lengths (text only), for the loop's own behaviour."""

    name, split = "lengths", "test"

    def __init__(self, tok, lengths):
        samples = [data.Sample(str(i), ((("x " * n).strip(), "A"),), None) for i, n in enumerate(lengths)]
        self.dataset = data.TokenizedDataset(samples, tok)

    def stop(self, text):
        return False


def test_a_batch_gets_the_room_of_its_longest_prompt_longest_batch_first(world, monkeypatch):  # noqa: F811
    model, tok = random_lavin(world.tok, max_seq_len=120), world.tok
    task = Prompts(tok, [3, 4, 50, 5, 2, 6])
    size = {s.pid: len(tok.encode(s.turns[0][0], bos=True, eos=False)) for s in task.dataset.samples}
    assert max(size.values()) + len(model.prefix_text) > 120 - 16  # the long one cannot have 16 new tokens
    batches = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, *a, **k: (batches.append(prompts),
                                                                             real(m, t, prompts, *a, **k))[1])
    texts = evaluate.evaluate(model, tok, task, batch_size=3, max_new_tokens=16, progress=False)
    assert set(texts) == set(size)
    assert max(map(len, batches[0])) == max(size.values())  # the longest batch first
    with pytest.raises(ContextTooLong):  # the check the batch budget keeps clear of
        real(model, eos_is(tok, -1), batches[0], max_new_tokens=16)


def _eval_worker(rank, world, init_file, root, out, results):
    import torch.distributed as dist

    from model import Tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = Tokenizer(Path(root) / "tokenizer.model")
        task = data.evaluation("shapes", root, "test", tok, resolution=32)
        result = evaluate.evaluate_split(random_lavin(tok), tok, task, output_dir=out, batch_size=4, rank=rank,
                                         world_size=world, progress=False)
        results.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_two_processes_evaluate_as_one(world, tmp_path):  # noqa: F811
    import torch.multiprocessing as mp

    one = evaluate.evaluate_split(random_lavin(world.tok), world.tok, world.task, output_dir=str(tmp_path / "one"),
                                  batch_size=4, progress=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_eval_worker, args=(r, 2, tmp_path / "init", str(world.root), str(tmp_path / "two"),
                                                    results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[1] is None and got[0] == one
    assert json.loads((tmp_path / "two" / "outputs.json").read_text()) == \
        json.loads((tmp_path / "one" / "outputs.json").read_text())


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("temperature", [5.0, 10.0])
def test_every_router_has_the_models_temperature(temperature):
    model = tiny_lavin(temperature=temperature)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == len(model.llama.layers) + len(model.visual.transformer.resblocks)
    assert {r.temperature for r in routers} == {temperature}
    assert IMAGE != TEXT
