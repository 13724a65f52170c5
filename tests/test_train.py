"""train.py: the MMT loop on a tiny shapes set (files in the official formats), CPU, Gloo: the
recipe, the epoch loop, the optimizer step, two processes, bad input, interruptions; what keeps the
step fast on a GPU (the ops one step dispatches, checkpointing inside a compiled block)."""
import builtins
import collections
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import data
import lavin
import train
from adapter import MMAdapter
from clip import ResidualAttentionBlock, VisionTransformer
from lavin import LaVIN, LaVINArgs
from model import Block, Llama, ModelArgs, load_llama, rope_angles
from tests.helpers import batch, config, losses, run_cli, run_two, tiny_args, tiny_lavin
from train import TrainConfig, UsageError


ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- recipe

def test_a_run_reads_problems_json_once_to_train_and_once_to_evaluate(tiny_set, tmp_path, monkeypatch):
    """The end of a run (evaluation, table, samples.png, the next command) shares one reading."""
    reads, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith("problems.json"):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # what Path.read_text opens with
    out = tmp_path / "run"
    result = train.main(config(tiny_set, out, max_steps=1, skip_eval=False, eval_split="test", eval_batch_size=32))
    assert len(reads) == 2
    assert result["eval"]["n"] == len(json.loads((tiny_set / "pid_splits.json").read_text())["test"])
    assert (out / "samples.png").is_file() and json.loads((out / "results.json").read_text()) == result["eval"]


def test_schedule_warms_up_then_follows_half_a_cosine_to_zero():
    cfg = TrainConfig(epochs=20, warmup_epochs=2)
    lr = 1.125e-3  # 9e-3 * 32 / 256
    assert train.lr_at(0, cfg, lr) == 0
    assert train.lr_at(1, cfg, lr) == pytest.approx(lr / 2)
    assert train.lr_at(2, cfg, lr) == pytest.approx(lr)  # end of warm-up: the peak
    assert train.lr_at(11, cfg, lr) == pytest.approx(lr / 2)  # half-way through the cosine
    assert train.lr_at(20, cfg, lr) == pytest.approx(0, abs=1e-12)
    e = 7.3
    assert train.lr_at(e, cfg, lr) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (e - 2) / 18)))


def test_weight_decay_spares_biases_and_1d_parameters(tiny_set, tmp_path):
    model = train.main(config(tiny_set, tmp_path, max_steps=1))["model"]
    opt = train.make_optimizer(model, TrainConfig(weight_decay=0.02), 1e-3, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.02 and opt.param_groups[1]["weight_decay"] == 0
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(not n.endswith(".bias") and model.get_parameter(n).ndim >= 2 for n in decay)
    assert "adapter_modality_embedding.weight" in decay and "adapter_proj.conv_A.bias" in no_decay
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- the loop

def test_one_step_changes_only_the_trainable_weights(tiny_set, tmp_path):
    torch.manual_seed(0)
    result = train.main(config(tiny_set, tmp_path, max_steps=1, warmup_epochs=0))  # warm-up starts at lr 0
    model = result["model"]
    assert result["steps"] == 1 and math.isfinite(result["loss"])
    llama, _ = load_llama(tiny_set / "llama")
    for k, v in llama.state_dict().items():  # the frozen LLaMA is what the files hold
        assert torch.equal(model.llama.state_dict()[k], v), k
    init = train.main(config(tiny_set, tmp_path / "init", max_steps=1, blr=1e-30))["model"]  # same init, no move
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, init.state_dict()[k])}
    assert changed and all("adapter" in k for k in changed)
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("llama.") for k in changed)
    ckpt = torch.load(tmp_path / "adapters.pth", weights_only=True)
    assert set(ckpt["model"]) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert ckpt["config"]["llama_path"] == str(tiny_set / "llama")  # sample.py --run reads its paths here


def test_log_has_one_line_per_step_and_the_lr_moves_every_iteration(tiny_set, tmp_path):
    train.main(config(tiny_set, tmp_path, epochs=3, warmup_epochs=2, max_steps=7))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert all({"step", "epoch", "loss", "lr", "samples_per_s"} <= set(r) for r in rows)
    lr = 9e-3 * 8 / 256
    # 3 steps per epoch, 2 micro-batches per step: the lr is set from the fractional epoch of the
    # window's first micro-batch, so it rises at every step of the warm-up, not once per epoch
    for i, r in enumerate(rows):  # independent of lr_at: warm-up over 2 epochs, then cosine over 1
        e = i / 3
        want = lr * e / 2 if e < 2 else lr * 0.5 * (1 + math.cos(math.pi * (e - 2) / 1))
        assert r["lr"] == pytest.approx(want)
    assert rows[0]["lr"] == 0 and rows[1]["lr"] > 0 and rows[6]["lr"] == pytest.approx(lr)
    assert [r["epoch"] for r in rows][2::3] == [1, 2]
    assert all(r["tokens_per_s"] > r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in rows[1:])
    assert all("peak_memory_gib" not in r for r in rows)  # a GPU's figure


def test_a_step_reports_the_adapters_gradient_norm_and_the_tokens_it_read():
    """train_step's gradient norm against the gradients of the same loss taken by hand (float64
    norm of every trainable parameter's gradient), and its count of the tokens read."""
    import copy

    model = tiny_lavin(seed=0, adapter_dropout=0.0).train()
    reference = copy.deepcopy(model)
    tokens, images, ind, labels = batch()
    micro = [{"tokens": tokens[:2], "images": images[:2], "img_indicator": ind[:2], "labels": labels[:2],
              "lengths": torch.tensor([7, 5])}, {"tokens": tokens[2:], "images": images[2:],
              "img_indicator": ind[2:], "labels": labels[2:], "lengths": torch.tensor([6])}]
    loss = sum(reference(b["tokens"], b["images"], b["img_indicator"], b["labels"], reduction="sum")
               for b in micro) / (labels != -100).sum()
    loss.backward()
    want = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in reference.parameters() if p.grad is not None))
    opt = train.make_optimizer(model, TrainConfig(), 1e-3, torch.device("cpu"))
    got, norm, n_read = train.train_step(model, micro, opt, None, torch.autocast("cpu", enabled=False),
                                         torch.device("cpu"), 1)
    assert got == pytest.approx(loss.item(), rel=1e-6)
    assert norm == pytest.approx(want, rel=1e-5) and want > 0
    assert n_read == 18


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


def test_two_processes_equal_one_loss_for_loss(tiny_set, tmp_path):
    """2 Gloo processes with batch 2 equal 1 process with batch 4 (dropout off)."""
    args = ["--data_path", str(tiny_set), "--epochs", "2", "--effective_batch", "8", "--adapter_dropout", "0",
            "--skip_eval"]
    run_two(tmp_path / "two", *args, "--batch_size", "2")
    train.main(config(tiny_set, tmp_path / "one", adapter_dropout=0.0))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-5, abs=0)
    assert len(set(one)) == 6  # the loss moved: the steps did something
    a = torch.load(tmp_path / "two" / "adapters.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "adapters.pth", weights_only=True)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly(tiny_set, tmp_path):
    """Interrupted after step 2 (mid-epoch, dropout on), resumed: losses equal the uninterrupted run's."""
    full = tmp_path / "full"
    train.main(config(tiny_set, full, max_steps=5))
    part = tmp_path / "part"
    train.main(config(tiny_set, part, max_steps=2))
    assert len(losses(part)) == 2
    with open(part / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    result = train.main(config(tiny_set, part, max_steps=5, resume=str(part / "checkpoint.pth")))
    assert result["steps"] == 5
    assert losses(part) == losses(full)  # bit for bit on the CPU, one line per step
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])


def test_resume_refuses_another_number_of_epochs(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=1))
    with pytest.raises(UsageError, match="epochs=2, this run has epochs=3"):
        train.main(config(tiny_set, out, epochs=3, resume=str(out / "checkpoint.pth")))


def test_atomic_save_survives_a_kill_while_writing(tmp_path):
    path = tmp_path / "checkpoint.pth"
    lavin.atomic_save({"step": 1, "w": torch.arange(10.0)}, path)
    code = ("import sys, torch, lavin; sys.stdout.write('go\\n'); sys.stdout.flush(); "
            f"lavin.atomic_save({{'step': 2, 'w': torch.ones(400_000_000, dtype=torch.uint8)}}, __import__('pathlib').Path({str(path)!r}))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"go"
    tmp = path.with_name(path.name + ".tmp")
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)  # killed mid-write
    p.wait()
    assert tmp.exists()  # it was writing when killed
    back = torch.load(path, weights_only=True)
    assert back["step"] == 1 and torch.equal(back["w"], torch.arange(10.0))


def test_two_processes_at_4_bits_equal_one(tiny_set, tmp_path):
    """DDP over a quantized LLaMA: 2 Gloo processes with batch 2 give 1 process's losses at batch 4."""
    import train

    run_two(tmp_path / "two", "--data_path", str(tiny_set), "--epochs", "2", "--effective_batch", "8",
            "--adapter_dropout", "0", "--skip_eval", "--bits", "4", "--max_steps", "3", "--batch_size", "2")
    train.main(config(tiny_set, tmp_path / "one", adapter_dropout=0.0, bits=4, max_steps=3))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=0)


# ----------------------------------------------------------------------------- the optimizer step

def test_adamw_has_the_papers_betas():
    opt = train.make_optimizer(tiny_lavin(), TrainConfig(), 1e-3, torch.device("cpu"))
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
    opt = train.make_optimizer(model, TrainConfig(), 1e-2, torch.device("cpu"))
    batch = {"tokens": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
             "images": torch.zeros(1, 3, 4, 4), "img_indicator": torch.ones(1, dtype=torch.long),
             "lengths": torch.tensor([3])}
    loss, _, _ = train.train_step(model, [batch], opt, None, torch.autocast("cpu", enabled=False), torch.device("cpu"), 1)
    assert not math.isfinite(loss)
    assert torch.equal(model.adapter_w, torch.ones(3, 2))  # no step: the weights are as they were, finite


# ----------------------------------------------------------------------------- NaN on one rank

def _nan_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_lavin(seed=0, randomize_adapters=True, adapter_dropout=0.0).train()
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        ddp = DDP(model)
        opt = train.make_optimizer(model, TrainConfig(), 1e-2, torch.device("cpu"))
        g = torch.Generator().manual_seed(rank)
        tokens = torch.randint(13, 50, (2, 6), generator=g)
        tokens[:, 0] = 1
        labels = tokens.clone()
        labels[:, :2] = -100
        images = torch.randn(2, 3, 32, 32, generator=g)
        if rank == 1:
            images[0, 0, 0, 0] = float("nan")  # this rank alone gets a NaN loss
        batch = {"tokens": tokens, "labels": labels, "images": images, "img_indicator": torch.tensor([1, 0]),
                 "lengths": torch.tensor([6, 6])}
        before = {k: v.clone() for k, v in model.state_dict().items() if "adapter" in k}
        autocast = torch.autocast("cpu", enabled=False)
        first, _, _ = train.train_step(ddp, [batch], opt, None, autocast, torch.device("cpu"), world)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        batch["images"] = torch.nan_to_num(batch["images"])
        second, _, _ = train.train_step(ddp, [batch], opt, None, autocast, torch.device("cpu"), world)
        moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and \
            all(torch.isfinite(model.state_dict()[k]).all() for k in before)  # moved, and to numbers
        results.put((rank, first, same, second, moved))
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_nan_worker, args=(r, 2, tmp_path / "init", results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, first, same, second, moved in got:
        assert not math.isfinite(first), rank  # both ranks see the NaN and skip
        assert same, rank  # ... so no weight moved
        assert math.isfinite(second) and moved, rank  # and the next clean step trains, without a hang
    assert got[0][3] == got[1][3]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,match", [
    (["--dataset", "scienceqa", "--llama_path", "/nonexistent/7B"], "no LLaMA weights in /nonexistent/7B: expected Meta's layout"),
    (["--clip_path", "/nonexistent/ViT-L-14.pt"], "no CLIP checkpoint at /nonexistent/ViT-L-14.pt"),
    (["--batch_size", "32", "--effective_batch", "32"], "does not fit in the 24 samples"),
    (["--batch_size", "3", "--effective_batch", "8"], "not a multiple of batch_size 3"),
    (["--prompt_format", "QCM-XYZ"], "unknown prompt format"),
    (["--preset", "lavin-70b"], "unknown preset 'lavin-70b'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--resume", "/nonexistent/checkpoint.pth"], "no such file"),
])
def test_bad_input_is_one_line_without_traceback(tiny_set, tmp_path, flags, match):
    r = run_cli("--data_path", str(tiny_set), "--output_dir", str(tmp_path), *flags)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "log.jsonl").exists()  # nothing ran


def test_resume_from_another_model_is_refused(tiny_set, tmp_path):
    train.main(config(tiny_set, tmp_path, max_steps=1))
    ckpt = str(tmp_path / "checkpoint.pth")
    with pytest.raises(UsageError, match="adapter_dim=8, this run has adapter_dim=4"):
        train.main(config(tiny_set, tmp_path / "b", adapter_dim=4, resume=ckpt))
    with pytest.raises(UsageError, match="temperature=10.0, this run has temperature=5.0"):
        train.main(config(tiny_set, tmp_path / "c", temperature=5.0, resume=ckpt))
    with pytest.raises(UsageError, match="not a train.py checkpoint"):
        train.main(config(tiny_set, tmp_path / "d", resume=str(tmp_path / "adapters.pth")))
    with pytest.raises(UsageError, match="same batch settings"):
        train.main(config(tiny_set, tmp_path / "e", effective_batch=4, resume=ckpt))


def test_corrupt_image_is_found_before_the_first_step(tiny_set, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_set, root)
    problems = json.loads((root / "problems.json").read_text())
    train_pids = json.loads((root / "pid_splits.json").read_text())["train"]
    pid = next(p for p in train_pids if problems[p]["image"])
    image = root / "images" / "train" / pid / "image.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated mid-file
    with pytest.raises(UsageError, match=f"1 image\\(s\\) of shapes/train cannot be read, first: sample {pid}"):
        train.main(config(root, tmp_path / "a"))
    assert not (tmp_path / "a" / "log.jsonl").exists()
    result = train.main(config(root, tmp_path / "b", skip_bad_images=True, max_steps=1))
    assert result["steps"] == 1


def corrupt(root: Path, k: int) -> list[str]:
    """Truncate the images of the first k image problems of the train split; their pids."""
    problems = json.loads((root / "problems.json").read_text())
    pids = [p for p in json.loads((root / "pid_splits.json").read_text())["train"] if problems[p]["image"]][:k]
    for pid in pids:
        image = root / "images" / "train" / pid / "image.png"
        image.write_bytes(image.read_bytes()[:60])
    return pids


def test_each_rank_checks_its_own_share_of_the_images(tiny_set, tmp_path, world):
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


def test_skip_bad_images_drops_every_bad_sample(tiny_set, tmp_path, world):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_set, root)
    bad = corrupt(root, 3)
    ds = data.build_dataset("shapes", str(root), "train", world.tok, resolution=32)
    n = len(ds)
    assert train.check_images(ds, True, rank=0, world=1) == 3
    assert len(ds) == len(ds.lengths) == n - 3 and not {s.pid for s in ds.samples} & set(bad)
    for i in range(len(ds)):  # every sample left loads
        ds[i]


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_set, tmp_path):
    train.main(config(tiny_set, tmp_path / "a", max_steps=2, adapter_dropout=0.0))
    b = train.main(config(tiny_set, tmp_path / "b", max_steps=2, adapter_dropout=0.0, grad_checkpointing=True))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    assert b["model"].llama.grad_checkpointing and b["model"].visual.grad_checkpointing


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


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: minutes on a cold cache
@pytest.mark.parametrize("bits", [16, 4])  # 4: the NF4 dequantization compiled into each block (LaVIN-lite)
def test_compiled_blocks_give_the_eager_loss_and_gradients(bits):
    """--compile fuses each block: the loss and the adapters' gradients stay the eager ones."""
    import quant

    tokens, images, ind, labels = batch()
    grads = []
    for compiled in (False, True):
        model = tiny_lavin(seed=0, adapter_dropout=0.0).train()
        quant.quantize_(model.llama.layers, bits)
        if compiled:
            for block in [*model.llama.layers, *model.visual.transformer.resblocks]:
                block.compile()
        loss = model(tokens, images, ind, labels)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (eager, g_eager), (fused, g_fused) = grads
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for n in g_eager:
        torch.testing.assert_close(g_fused[n], g_eager[n], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- nothing lost, nothing silent

def test_ctrl_c_saves_the_step_and_says_how_to_resume(tiny_set, tmp_path):
    """A real SIGINT to `python train.py`: the step in progress ends, checkpoint.pth holds it, one
    line gives the --resume command, the exit status is 130; the command then continues the run."""
    out = tmp_path / "run"
    args = ["--data_path", str(tiny_set), "--output_dir", str(out), "--epochs", "200", "--batch_size", "4",
            "--effective_batch", "8", "--skip_eval"]
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 4):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    steps = losses(out)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == len(steps) >= 4 and len(steps) < 600  # stopped early, nothing after the save
    line = err.strip().splitlines()[-1]
    assert f"holds step {len(steps)} of 600" in line and f"--resume {out / 'checkpoint.pth'}" in line
    command = line.split("continue with")[1].split()  # python train.py ... --resume .../checkpoint.pth
    r = run_cli(*command[2:], "--max_steps", str(len(steps) + 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == \
        list(range(1, len(steps) + 3))


def test_the_count_of_skipped_steps_survives_a_resume(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=2))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["skipped"] = 1  # as if one of the two steps had had an inf loss
    torch.save(ckpt, out / "checkpoint.pth")
    result = train.main(config(tiny_set, out, max_steps=3, resume=str(out / "checkpoint.pth")))
    assert result["skipped"] == 1 and torch.load(out / "checkpoint.pth", weights_only=True)["skipped"] == 1


def test_a_file_that_is_not_a_checkpoint_is_one_line(tiny_set, tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    r = run_cli("--data_path", str(tiny_set), "--output_dir", str(tmp_path / "out"), "--resume", str(bad))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "not a readable checkpoint" in lines[0], r.stderr


def test_a_warning_is_one_plain_line(tiny_set, tmp_path):
    """Python's own format would add the file, the line number and the source line."""
    r = run_cli("--data_path", str(tiny_set), "--output_dir", str(tmp_path / "o"), "--max_seq_len", "40",
                "--max_steps", "1", "--skip_eval", "--batch_size", "4", "--effective_batch", "8")
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if "were truncated" in x]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "max_seq_len=40" in warned[0]
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


def test_a_mistyped_shapes_folder_is_an_error_not_a_new_set(tmp_path):
    r = run_cli("--dataset", "shapes", "--data_path", str(tmp_path / "shapez"), "--output_dir", str(tmp_path / "o"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and f"no shapes set in {tmp_path / 'shapez'}" in lines[0], r.stderr
    assert not (tmp_path / "shapez").exists()


# ----------------------------------------------------------------------------- fast on a GPU, checked on the CPU

OFFICIAL_OPS = 3548  # the official LaVIN code's training step at the config below, counted the same way


class CountOps(TorchDispatchMode):
    """Every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_dispatches_no_more_ops_than_the_official_one():
    """One eager fp32 step of train.py (forward, loss, backward, AdamW, zero_grad) of LaVIN at a
    mid-size config: LLaMA dim 512 x 4 layers, vocab 3,000; CLIP width 1024 x 8 blocks at 28 px,
    patch 14; batch 4 (two with an image) x 128 tokens; AdamW fused, as train.py makes it on a GPU,
    where each op is a kernel launch. The official code dispatches 3,548 ops for it; ours did
    4,296 before the adapters lost einsum's views and copies and the modality token its rotation.
    (On the CPU train.py takes foreach AdamW, bit for bit the plain loop's update, which reads each
    parameter's step count back: 217 ops more. The plain loop it replaced: 5,252 in all before.)
    Counted with torch 2.13, the one CI installs: another release may decompose ops otherwise."""
    torch.manual_seed(0)
    llama = Llama(ModelArgs(dim=512, n_layers=4, n_heads=8, vocab_size=3000, multiple_of=256))
    visual = VisionTransformer(resolution=28, patch_size=14, width=1024, layers=8, output_dim=512)
    model = LaVIN(LaVINArgs(), llama, visual, [7, 8, 9], [7, 8, 10, 11]).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 3000, (4, 128), generator=g)
    tokens[:, 0] = 1  # BOS
    labels = tokens.masked_fill(torch.arange(128) < 64, -100)  # the second half is the answer
    batch = {"tokens": tokens, "labels": labels, "images": torch.randn(4, 3, 28, 28, generator=g),
             "img_indicator": torch.tensor([1, 1, 0, 0]), "lengths": torch.full((4,), 128)}
    opt = train.make_optimizer(model, TrainConfig(), 1e-3, torch.device("cuda"))  # the one a GPU run makes
    no_autocast = torch.autocast("cpu", enabled=False)
    train.train_step(model, [batch], opt, None, no_autocast, torch.device("cpu"), 1)  # AdamW's state made
    with CountOps() as count:
        train.train_step(model, [batch], opt, None, no_autocast, torch.device("cpu"), 1)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran
    assert count.ops["aten._fused_adamw_"] == 2  # one per parameter group: AdamW ran, fused
    n = sum(count.ops.values())
    assert n <= OFFICIAL_OPS, f"{n} ops; the most common: {count.ops.most_common(8)}"


def saved_bytes(module, call):
    """Bytes autograd saves for the backward pass while call() runs, leaving out the module's own
    parameters (held anyway): the activations a block keeps."""
    own = {p.data_ptr() for p in module.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    return out, sum(saved)


def llama_block():
    torch.manual_seed(0)
    args = tiny_args(n_layers=1, vocab_size=50)
    block = Block(args)
    block.adapter_attn = MMAdapter(64, dropout=0.0)
    routes = (torch.softmax(torch.randn(2, 1, 2), -1), None)

    def run(x, recompute):
        rope = rope_angles(torch.arange(x.shape[1]) + 1, args.head_dim, args.rope_theta)
        return block(x, rope, routes=routes, recompute=recompute)[0]

    return block, run, (2, 48, 64)


def clip_block():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 1)
    block.adapter_attn = MMAdapter(64, dropout=0.0)
    return block, lambda x, recompute: block(x, recompute), (2, 48, 64)


@pytest.mark.parametrize("make", [llama_block, clip_block], ids=["llama", "clip"])
def test_a_compiled_block_recomputes_itself_and_gives_the_eager_gradients(make):
    """--compile --grad_checkpointing: torch.compile sees the checkpoint inside the block, so the
    compiled block keeps little more than its input for the backward pass (not its activations)
    and its gradients are the eager block's, fp32. Whole: no graph break, at a second and a third
    sequence length too (a training run's batches differ in length: the compiler then makes the
    length symbolic, and a graph break would leave the checkpoint to eager code again)."""
    from torch._dynamo.utils import counters

    counters.clear()
    block, run, shape = make()
    for name, p in block.named_parameters():  # frozen backbone, trainable adapter, live up-projections
        p.requires_grad_(name.startswith("adapter_attn."))
        if name.startswith("adapter_attn."):
            torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randn(shape)
    results = []
    for compiled, recompute in ((False, False), (True, True)):
        if compiled:
            block.compile()
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y, kept = saved_bytes(block, lambda: run(x, recompute))
        y.pow(2).sum().backward()
        grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, grads, kept))
    (y_e, gx_e, g_e, kept_eager), (y_c, gx_c, g_c, kept_compiled) = results
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    assert set(g_c) == set(g_e) and g_e
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-4, atol=1e-5, msg=n)
    # the eager block keeps ~15 activations of the input's size or larger; recomputing, ~2
    assert kept_compiled < 0.3 * kept_eager, (kept_compiled, kept_eager)
    for length in (40, 44):
        run(torch.randn(shape[0], length, shape[2], requires_grad=True), True).sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
