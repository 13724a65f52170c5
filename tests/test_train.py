"""train.py: the MMT loop on a tiny shapes set (files in the official formats), CPU, Gloo."""
import builtins
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import train
from config import PRESETS
from model import load_llama
from train import TrainConfig, UsageError

ROOT = Path(__file__).resolve().parent.parent


def config(tiny_set, out, **kw) -> TrainConfig:
    """The shapes preset, shrunk: 24 training samples, 3 steps of 8 per epoch."""
    base = dict(PRESETS["shapes"].flags, preset="shapes", data_path=str(tiny_set), output_dir=str(out), epochs=2,
                batch_size=4, effective_batch=8, skip_eval=True)
    return TrainConfig(**{**base, **kw})


def losses(out: Path) -> list:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in r]


def run_cli(*args, nproc=0, timeout=120):
    cmd = [sys.executable, "train.py", *args] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_two(out: Path, *args):
    """train.py under torchrun with 2 Gloo processes into out, which must succeed. torchrun's launch
    failed once in ~10 suite runs, and a process now and then aborts at exit: it gets one more try."""
    r = run_cli(*args, "--output_dir", str(out), nproc=2)
    if r.returncode != 0:
        warnings.warn(f"torchrun failed, retrying once:\n{r.stderr[-3000:]}")  # and show why
        shutil.rmtree(out, ignore_errors=True)
        r = run_cli(*args, "--output_dir", str(out), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]


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


def test_presets_follow_the_paper_and_flags_win(capsys):
    cfg, notes = train.make_config(["--preset", "lavin-7b"])
    assert (cfg.dataset, cfg.epochs, cfg.effective_batch, cfg.blr, cfg.warmup_epochs, cfg.weight_decay,
            cfg.max_seq_len, cfg.prompt_format, cfg.adapter_dim, cfg.temperature) == \
        ("scienceqa", 20, 32, 9e-3, 2.0, 0.02, 512, "QCM-ALE", 8, 10.0)
    assert notes == []
    assert train.make_config(["--preset", "lavin-13b"])[0].temperature == 5.0
    assert train.make_config(["--dataset", "scienceqa"])[0].preset == "lavin-7b"
    assert train.make_config(["--dataset", "instruct"])[0].preset == "chatbot-7b"
    cfg, notes = train.make_config(["--preset", "lavin-13b", "--temperature", "10", "--epochs", "3"])
    assert (cfg.temperature, cfg.epochs) == (10.0, 3)
    assert any("--temperature 10.0 overrides preset lavin-13b's temperature=5.0" in n for n in notes)
    with pytest.raises(UsageError, match="unknown preset 'lavin-70b': use one of lavin-7b, lavin-13b"):
        train.make_config(["--preset", "lavin-70b"])
    with pytest.raises(UsageError, match="unknown dataset 'imagenet': use one of scienceqa, shapes, instruct"):
        train.make_config(["--dataset", "imagenet"])


def test_weight_decay_spares_biases_and_1d_parameters(tiny_set, tmp_path):
    model = train.main(config(tiny_set, tmp_path, max_steps=1))["model"]
    opt = train.make_optimizer(model, TrainConfig(weight_decay=0.02), 1e-3, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.02 and opt.param_groups[1]["weight_decay"] == 0
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(not n.endswith(".bias") and model.get_parameter(n).ndim >= 2 for n in decay)
    assert "adapter_modality_embedding.weight" in decay and "adapter_proj.conv_A.bias" in no_decay
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())


# LLaMA-7B (32 blocks of 4096) and ViT-L (24 of 1024), adapters of width 8 in 2 groups: per block
# down d*8+8, each up d*8/2+d, router 2d+2; the neck 1024*128+128 + 128*4096+4096; modality 2*4096.
@pytest.mark.parametrize("preset,count", [
    ("lavin-7b", "3,781,296"), ("lavin-13b", "5,390,080"),
    ("lavin-7b --no_visual", f"{32 * (32776 + 2 * 20480 + 8194) + 8192:,}"),  # LLaMA's adapters alone
    ("lavin-7b --no_router", f"{32 * (32776 + 20480) + 24 * (8200 + 5120) + 659584:,}")])  # one up-projection
def test_dry_run_prints_the_papers_parameter_counts_without_files(preset, count, tmp_path):
    r = run_cli("--preset", *preset.split(), "--dry_run", "--llama_path", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    trainable = [line for line in r.stdout.splitlines() if line.startswith("trainable")]
    assert trainable and trainable[0].split()[-1] == count


def test_an_ablation_never_writes_over_the_full_run():
    outs = {flags: train.resolve(train.make_config(["--dataset", "shapes", *flags])[0]).output_dir
            for flags in [(), ("--no_visual",), ("--no_router",), ("--no_visual", "--no_router")]}
    assert list(outs.values()) == ["out/shapes", "out/shapes-no_visual", "out/shapes-no_router",
                                   "out/shapes-no_visual-no_router"]


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


def test_atomic_save_survives_a_kill_while_writing(tmp_path):
    path = tmp_path / "checkpoint.pth"
    train.atomic_save({"step": 1, "w": torch.arange(10.0)}, path)
    code = ("import sys, torch, train; sys.stdout.write('go\\n'); sys.stdout.flush(); "
            f"train.atomic_save({{'step': 2, 'w': torch.ones(400_000_000, dtype=torch.uint8)}}, __import__('pathlib').Path({str(path)!r}))")
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


# ----------------------------------------------------------------------------- NaN on one rank

def _nan_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.test_lavin import tiny_lavin

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_lavin(seed=0, randomize_adapters=True, adapter_dropout=0.0).train()
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        ddp = DDP(model)
        opt = train.make_optimizer(model, TrainConfig(), 1e-2, fused=False)
        g = torch.Generator().manual_seed(rank)
        tokens = torch.randint(13, 50, (2, 6), generator=g)
        tokens[:, 0] = 1
        labels = tokens.clone()
        labels[:, :2] = -100
        images = torch.randn(2, 3, 32, 32, generator=g)
        if rank == 1:
            images[0, 0, 0, 0] = float("nan")  # this rank alone gets a NaN loss
        batch = {"tokens": tokens, "labels": labels, "images": images, "img_indicator": torch.tensor([1, 0])}
        before = {k: v.clone() for k, v in model.state_dict().items() if "adapter" in k}
        autocast = torch.autocast("cpu", enabled=False)
        first = train.train_step(ddp, [batch], opt, None, autocast, torch.device("cpu"), world)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        batch["images"] = torch.nan_to_num(batch["images"])
        second = train.train_step(ddp, [batch], opt, None, autocast, torch.device("cpu"), world)
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


def test_missing_scienceqa_release_names_the_layout(tiny_set, tmp_path):
    cfg = config(tiny_set, tmp_path, dataset="scienceqa", preset="lavin-7b", data_path=str(tmp_path / "sqa"),
                 llama_path=str(tiny_set / "llama"), clip_path=str(tiny_set / "clip" / "ViT-tiny.pt"))
    with pytest.raises(UsageError, match="no ScienceQA release in .*problems.json, pid_splits.json"):
        train.main(cfg)


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


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_set, tmp_path):
    train.main(config(tiny_set, tmp_path / "a", max_steps=2, adapter_dropout=0.0))
    b = train.main(config(tiny_set, tmp_path / "b", max_steps=2, adapter_dropout=0.0, grad_checkpointing=True))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    assert b["model"].llama.grad_checkpointing and b["model"].visual.grad_checkpointing


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: minutes on a cold cache
@pytest.mark.parametrize("bits", [16, 4])  # 4: the NF4 dequantization compiled into each block (LaVIN-lite)
def test_compiled_blocks_give_the_eager_loss_and_gradients(bits):
    """--compile fuses each block: the loss and the adapters' gradients stay the eager ones."""
    import quant
    from tests.test_lavin import batch, tiny_lavin

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


def test_a_second_run_into_a_used_folder_is_refused(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=2))
    with pytest.raises(UsageError, match=f"{out} already holds a run .*--resume {out / 'checkpoint.pth'}.*--output_dir"):
        train.main(config(tiny_set, out, max_steps=1))
    assert len(losses(out)) == 2  # untouched
    train.main(config(tiny_set, out, max_steps=1, overwrite=True))
    assert len(losses(out)) == 1  # a new log, not one appended to the old


def test_a_folder_holding_only_a_log_is_refused_too(tiny_set, tmp_path):
    """A run that died before its first checkpoint leaves log.jsonl alone: still a run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UsageError, match=rf"{out} already holds a run \(log.jsonl\)"):
        train.main(config(tiny_set, out, max_steps=1))
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_the_count_of_skipped_steps_survives_a_resume(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=2))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["skipped"] = 1  # as if one of the two steps had had an inf loss
    torch.save(ckpt, out / "checkpoint.pth")
    result = train.main(config(tiny_set, out, max_steps=3, resume=str(out / "checkpoint.pth")))
    assert result["skipped"] == 1 and torch.load(out / "checkpoint.pth", weights_only=True)["skipped"] == 1


def test_the_output_folders_the_readme_names():
    from config import make_config, resolve

    def out(*argv):
        return resolve(make_config(list(argv))[0]).output_dir

    assert out("--dataset", "shapes") == "out/shapes" and out("--dataset", "shapes", "--bits", "4") == "out/shapes-4bit"
    assert out("--dataset", "shapes", "--no_router") == "out/shapes-no_router"
    assert out("--preset", "lavin-7b-lite") == "out/lavin-7b-lite"  # its own bits: no suffix
    assert out("--preset", "lavin-7b-lite", "--bits", "16") == "out/lavin-7b-lite-16bit"
    assert out("--preset", "lavin-13b-lite", "--output_dir", "x") == "x"


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


def test_every_flag_has_its_help():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for f in dataclasses.fields(TrainConfig):
        after = r.stdout.split(f"--{f.name}", 2)[-1].split("\n  --")[0]  # the flag's entry in the options list
        assert len(after.split()) >= 3, f"--{f.name} has no help: {after!r}"
    for flag, shown in (("dataset", "{scienceqa,shapes,instruct,shapes-chat,coco,shapes-coco}"), ("bits", "{16,8,4}"),
                        ("precision", "{auto,bf16,fp16,fp32}"), ("instruct_mode", "{recipe,multiturn}"),
                        ("image_mode", "{lavin,clip}")):
        assert f"--{flag} {shown}" in r.stdout
    assert "--preset {lavin-7b,lavin-13b,lavin-7b-lite,lavin-13b-lite," in r.stdout
