"""Mixture-of-Modality Training (paper, section 3.3): LaVIN's adapters learn, everything else stays frozen.

    python train.py --dataset shapes                        # the laptop run, everything defaulted
    torchrun --nproc_per_node 8 train.py --dataset scienceqa --preset lavin-7b \\
        --llama_path weights/7B --clip_path weights/ViT-L-14.pt --data_path data/scienceqa --output_dir out/lavin-7b
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...

    TrainConfig ─(preset, then explicit flags)─> load LLaMA + CLIP (frozen, bf16/fp16 on GPU) + fresh fp32 adapters
      └─ per optimizer step: accum_iter micro-batches of image and text-only samples, mixed
           loss = sum of answer-token cross-entropies / answer tokens of the whole step (all ranks)
           DDP all-reduces the adapters' gradients (no_sync on the non-final micro-steps)
           AdamW, lr from the fractional epoch (warm-up, then half-cycle cosine to 0)
      └─ output_dir: log.jsonl (a line per step), checkpoint.pth (--resume), adapters.pth (sample.py),
                     results.json + preds.json (the accuracy table, by sample.py's evaluator)

The loss is normalised by the answer tokens of the whole optimizer step across all processes,
so the gradient is the same for 1 process with batch 2b and 2 with batch b (the reference
averages per-micro-batch means, which weights samples by the length of their neighbours' answers
and makes accuracy depend on the GPU count).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

import data
import data.shapes
from adapter import load_trainable, trainable_state_dict
from data.batching import IGNORE_INDEX
from lavin import LaVIN, LaVINArgs, atomic_save, build_preset, load_lavin, save_adapters, summary


@dataclass
class TrainConfig:
    # what to train on
    dataset: str = "shapes"  # scienceqa | shapes | instruct
    preset: str = ""  # lavin-7b | lavin-13b | chatbot-7b | shapes; "" = the dataset's own recipe
    data_path: str = ""  # "" = data/{dataset}; the shapes folder also holds its tiny backbones
    llama_path: str = ""  # LLaMA folder (Meta or Hugging Face layout); "" = the preset's default
    clip_path: str = ""  # OpenAI CLIP checkpoint; "" = the preset's default
    output_dir: str = ""  # "" = out/{preset}, and -no_visual / -no_router for the ablations
    # the recipe (DESIGN.md section 3); presets set these
    epochs: int = 20
    batch_size: int = 4  # per process
    accum_iter: int = 0  # micro-batches per optimizer step; 0 = reach effective_batch
    effective_batch: int = 32  # batch_size x accum_iter x processes, when accum_iter is 0
    blr: float = 9e-3  # base lr: lr = blr * effective batch / 256
    warmup_epochs: float = 2.0
    weight_decay: float = 0.02  # none on biases and 1-D parameters
    max_seq_len: int = 512
    prompt_format: str = "QCM-ALE"
    adapter_dim: int = 8
    temperature: float = 10.0  # router softmax temperature: 10 for 7B, 5 for 13B
    adapter_dropout: float = 0.1
    image_mode: str = "lavin"  # lavin (224x224 resize, ImageNet mean/std: the released weights) | clip
    no_visual: bool = False  # ablation: no visual tokens, no CLIP adapters (image problems read "Image: N/A")
    no_router: bool = False  # ablation: one adapter path for both modalities instead of two and a router
    # the run
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (counted from the start); 0 = all
    resume: str = ""  # a checkpoint.pth to continue from
    save_interval: int = 0  # optimizer steps between checkpoints; 0 = once per epoch
    num_workers: int = -1  # DataLoader workers per process; -1 = 4 on a GPU, 0 on the CPU
    device: str = ""  # "" = cuda if there is one, else cpu
    precision: str = "auto"  # auto (bf16 where supported, else fp16 on GPU; fp32 on CPU) | bf16 | fp16 | fp32
    grad_checkpointing: bool = False  # recompute the frozen blocks in the backward pass
    compile: bool = False  # torch.compile each transformer block
    skip_bad_images: bool = False  # drop samples whose image file is unreadable instead of stopping
    dry_run: bool = False  # build the model, print the parameter summary, stop
    skip_eval: bool = False  # no evaluation at the end
    eval_split: str = "test"
    eval_batch_size: int = 16


WEIGHTS = {"7B": "weights/7B", "13B": "weights/13B", "vicuna-7b": "weights/vicuna-7b"}
PRESETS = {  # the paper's recipes; an explicit flag wins over its preset
    "lavin-7b": dict(dataset="scienceqa", llama_path=WEIGHTS["7B"], clip_path="weights/ViT-L-14.pt",
                     temperature=10.0),
    "lavin-13b": dict(dataset="scienceqa", llama_path=WEIGHTS["13B"], clip_path="weights/ViT-L-14.pt",
                      temperature=5.0),
    # LaVIN's chatbot: Vicuna, Alpaca-52k + LLaVA-Instruct, 15 epochs, 0.2 warm-up epochs
    "chatbot-7b": dict(dataset="instruct", llama_path=WEIGHTS["vicuna-7b"], clip_path="weights/ViT-L-14.pt",
                       epochs=15, warmup_epochs=0.2, temperature=10.0),
    # The laptop demo: tiny backbones inside data/shapes, the paper's recipe (lr, batch, warm-up
    # then cosine) on two CPU cores in three minutes: 10 epochs of 3,600 problems, answer only
    # (QCM-A: the tiny LLaMA never read lectures, and learning them through 44k adapter weights
    # costs the answers). The 20 epochs of 1,800 problems tried before learnt the training
    # pictures by heart (image questions: 56% on test).
    "shapes": dict(dataset="shapes", batch_size=16, max_seq_len=256, prompt_format="QCM-A", eval_batch_size=64,
                   epochs=10, warmup_epochs=1.0),
}
DATASET_PRESET = {"scienceqa": "lavin-7b", "shapes": "shapes", "instruct": "chatbot-7b"}
ARCHITECTURE = {"lavin-7b": "lavin-7b", "lavin-13b": "lavin-13b", "chatbot-7b": "lavin-7b"}  # lavin.PRESETS, for --dry_run


class UsageError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def make_config(argv=None) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from the command line: the dataclass defaults, then the preset (by default the
    dataset's own), then the flags given. Returns the config and notes on flags that overrode it."""
    p = argparse.ArgumentParser(description="Mixture-of-Modality Training of LaVIN.")
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name}"
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=argparse.SUPPRESS)
    given = vars(p.parse_args(argv))  # only the flags on the command line
    preset = preset_of(given.get("dataset", TrainConfig.dataset), given.get("preset", ""))
    values = {**PRESETS[preset], "preset": preset}
    notes = [f"--{k} {v} overrides preset {preset}'s {k}={values[k]}" for k, v in given.items()
             if k in values and values[k] != v]
    return TrainConfig(**{**values, **given}), notes


def preset_of(dataset: str, preset: str) -> str:
    """The preset a run uses (by default the dataset's own), after checking both names."""
    if dataset not in DATASET_PRESET:
        raise UsageError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASET_PRESET)}")
    if preset and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return preset or DATASET_PRESET[dataset]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the paths left empty with their defaults, and check the values."""
    preset = preset_of(cfg.dataset, cfg.preset)
    data_path = cfg.data_path or data.DEFAULT_ROOTS[cfg.dataset]
    shapes = cfg.dataset == "shapes"
    ablation = "-no_visual" * cfg.no_visual + "-no_router" * cfg.no_router  # never over the full run
    cfg = dataclasses.replace(
        cfg, preset=preset, data_path=data_path, output_dir=cfg.output_dir or f"out/{preset}{ablation}",
        llama_path=cfg.llama_path or (f"{data_path}/llama" if shapes else PRESETS[preset].get("llama_path", "")),
        clip_path=cfg.clip_path or (f"{data_path}/clip/ViT-tiny.pt" if shapes else PRESETS[preset].get("clip_path", "")))
    for name in ("epochs", "batch_size", "effective_batch", "max_seq_len", "adapter_dim", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.accum_iter < 0 or cfg.max_steps < 0 or cfg.blr <= 0 or cfg.temperature <= 0:
        raise UsageError("--accum_iter and --max_steps must be >= 0, --blr and --temperature > 0")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"unknown precision {cfg.precision!r}: use auto, bf16, fp16 or fp32")
    if not 0 <= cfg.adapter_dropout < 1 or not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise UsageError("--adapter_dropout must be in [0, 1), --warmup_epochs in [0, epochs]")
    try:
        data.scienceqa.check_format(cfg.prompt_format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def check_inputs(cfg: TrainConfig):
    """Every file the run needs, before any compute: a missing one says what was expected."""
    llama = Path(cfg.llama_path)
    if not (llama / "params.json").is_file() and not (llama / "config.json").is_file():
        raise UsageError(
            f"no LLaMA weights in {llama}: expected Meta's layout (params.json, consolidated.00.pth, ..., "
            f"tokenizer.model in the folder or its parent) or Hugging Face's (config.json, *.safetensors or "
            f"pytorch_model*.bin, tokenizer.model); request them from Meta (or Vicuna's from Hugging Face) "
            f"and pass --llama_path")
    if not Path(cfg.clip_path).is_file():
        raise UsageError(f"no CLIP checkpoint at {cfg.clip_path}: expected OpenAI's ViT-L-14.pt (the file "
                         f"the openai/CLIP package downloads for 'ViT-L/14'); pass --clip_path")
    root = Path(cfg.data_path)
    if cfg.dataset == "scienceqa" and not (root / "problems.json").is_file():
        raise UsageError(f"no ScienceQA release in {root}: expected problems.json, pid_splits.json and "
                         f"images/{{train,val,test}}/<pid>/image.png from the ScienceQA repository's data "
                         f"download; pass --data_path")
    if cfg.dataset == "instruct" and not (root / data.instruct.ALPACA).is_file():
        raise UsageError(f"no instruction data in {root}: expected {data.instruct.ALPACA} (Alpaca) and "
                         f"{', '.join(data.instruct.LLAVA)} (LLaVA-Instruct), COCO train2014 images in "
                         f"{data.instruct.DEFAULT_COCO_ROOT}; pass --data_path")


# ----------------------------------------------------------------------------- distributed, precision

def setup_distributed(device: str):
    """(rank, world size, device): torchrun's environment if present (NCCL on GPUs, Gloo on the
    CPU), else a single plain process."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- schedule, optimizer

def lr_at(epoch: float, cfg: TrainConfig, lr: float) -> float:
    """Linear warm-up over warmup_epochs, then half a cosine down to 0 at the last epoch; `epoch`
    is fractional (the official loop updates it every iteration)."""
    if epoch < cfg.warmup_epochs:
        return lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: LaVIN, cfg: TrainConfig, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


class SkipBatches(Sampler):
    """The first `skip` batches of an epoch left out: where a resumed run picks up."""

    def __init__(self, batches: Sampler, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch

    def __len__(self):
        return max(len(self.batches) - self.skip, 0)


# ----------------------------------------------------------------------------- checkpoints

def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def save_checkpoint(out: Path, model: LaVIN, opt, scaler, step: int, cfg: TrainConfig, rank: int,
                    world: int, device: torch.device, extra: dict):
    """checkpoint.pth (what --resume reads) and adapters.pth (what sample.py reads). Every rank
    calls this: the RNG states of all ranks go into the file, written by rank 0."""
    rngs = [rng_state(device)]
    if dist.is_initialized():
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if rank != 0:
        return
    state = {"model": {k: v.detach().float().cpu() for k, v in trainable_state_dict(model).items()},
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "step": step, "rng": rngs, "world_size": world, "config": asdict(cfg),
             "lavin_args": asdict(model.args), "llama_args": asdict(model.llama.args), **extra}
    atomic_save(state, out / "checkpoint.pth")
    save_adapters(out / "adapters.pth", model, config=asdict(cfg), step=step)


def read_resume(cfg: TrainConfig) -> dict:
    """The checkpoint to resume from, checked against this run's model settings."""
    path = Path(cfg.resume)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "config", "lavin_args"} <= set(ckpt):
        raise UsageError(f"--resume {path}: not a train.py checkpoint (adapters.pth only holds weights: "
                         f"resume from checkpoint.pth)")
    mine = asdict(lavin_args(cfg))
    for key, theirs in ckpt["lavin_args"].items():
        if key != "adapter_dropout" and mine.get(key) != theirs:
            raise UsageError(f"--resume {path} was trained with {key}={theirs}, this run has {key}={mine.get(key)} "
                             f"(preset {ckpt['config'].get('preset')} vs {cfg.preset})")
    for key in ("dataset", "epochs"):
        if ckpt["config"].get(key) != getattr(cfg, key):
            raise UsageError(f"--resume {path} comes from a run with {key}={ckpt['config'].get(key)}, "
                             f"this run has {key}={getattr(cfg, key)}")
    return ckpt


def show_samples(cfg: TrainConfig, out: Path) -> None:
    """samples.png (a dozen test images, the model's answers) and the next command to try."""
    from data.scienceqa import build_prompt
    from data.table import draw_samples

    root = cfg.data_path  # resolve() filled it in
    preds = json.loads((out / "preds.json").read_text())
    drawn = draw_samples(root, cfg.eval_split, preds, out / "samples.png")
    if not drawn:
        return
    pid = drawn[0][0]
    problem = json.loads((Path(root) / "problems.json").read_text())[pid]
    prompt = build_prompt(problem, cfg.prompt_format)[0].replace("\n", "\\n")  # as typed in a shell
    print(f"wrote {out / 'samples.png'} ({sum(r for _, r in drawn)} of {len(drawn)} right). Ask it yourself:\n"
          f'  python sample.py --run {out} --image {Path(root) / "images" / cfg.eval_split / pid / problem["image"]} '
          f'--prompt "{prompt}"')


def lavin_args(cfg: TrainConfig) -> LaVINArgs:
    return LaVINArgs(adapter_dim=cfg.adapter_dim, temperature=cfg.temperature, adapter_dropout=cfg.adapter_dropout,
                     visual=not cfg.no_visual, router=not cfg.no_router)


# ----------------------------------------------------------------------------- data

def check_images(ds, skip: bool, rank: int, world: int) -> int:
    """Open every image of the split (header and checksums, no decoding) before the first step:
    a corrupt file stops the run now, not hours in. Each rank checks a share. With skip, the
    samples are dropped instead; returns how many."""
    from PIL import Image
    from tqdm import tqdm

    todo = [(i, s) for i, s in enumerate(ds.samples) if s.image is not None][rank::world]
    bad = []
    for i, s in tqdm(todo, desc="checking images", unit="img", disable=rank != 0 or len(todo) < 500,
                     mininterval=2.0):
        try:
            with Image.open(s.image) as im:
                im.verify()
        except Exception as e:
            bad.append((i, s.pid, s.image, f"{type(e).__name__}: {e}"))
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, bad)
        bad = sorted(b for part in parts for b in part)
    if bad and not skip:
        i, pid, path, why = bad[0]
        raise UsageError(f"{len(bad)} image(s) of {ds.name} cannot be read, first: sample {pid}, {path} ({why}); "
                         f"replace them or pass --skip_bad_images to train without those samples")
    ds.drop([b[0] for b in bad])
    return len(bad)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(ddp, micro: list, opt, scaler, autocast, device, world: int) -> float:
    """Forward and backward over the micro-batches of one optimizer step, then the AdamW step.
    Returns the step's mean loss per answer token over all ranks: NaN (or inf) when the step was
    skipped, which every rank then does together (they all see the same summed loss)."""
    # The answer tokens of the whole step, over every rank: the loss's denominator.
    n_tokens = all_sum(torch.tensor(float(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro)), device=device))
    scale = world / n_tokens.clamp(min=1)  # DDP averages gradients over ranks: undo that, divide by the total
    loss_sum = torch.zeros((), device=device)
    for j, b in enumerate(micro):
        sync = j == len(micro) - 1 or world == 1  # all-reduce the gradients once, after the last micro-step
        with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items() if torch.is_tensor(v)}
            part = ddp(b["tokens"], b["images"], b["img_indicator"], b["labels"], reduction="sum")
            loss = part * scale
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += part.detach().float()
    # NaN when there is nothing to learn from (every answer truncated away); one host sync per step
    loss_value = torch.where(n_tokens > 0, all_sum(loss_sum) / n_tokens.clamp(min=1), float("nan")).item()
    if math.isfinite(loss_value):
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    elif scaler:  # as GradScaler does on an overflow: back off the scale
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    opt.zero_grad(set_to_none=True)
    return loss_value


# ----------------------------------------------------------------------------- the run

def dry_run(cfg: TrainConfig, device: torch.device):
    """The parameter summary: from the weights when they are there, else from the preset's config
    on the meta device (no memory, no files)."""
    if Path(cfg.llama_path).is_dir() and Path(cfg.clip_path).is_file():
        model, _ = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(cfg), device=device, dtype=torch.float32,
                              max_seq_len=cfg.max_seq_len)
        where = f"from {cfg.llama_path} and {cfg.clip_path}"
    elif cfg.preset in ARCHITECTURE:
        model = build_preset(ARCHITECTURE[cfg.preset], args=lavin_args(cfg))
        where = f"{ARCHITECTURE[cfg.preset]}'s LLaMA and ViT-L/14 configs on the meta device (no weights read)"
    else:
        raise UsageError(f"--dry_run needs the weights ({cfg.llama_path}, {cfg.clip_path}) for preset {cfg.preset}")
    print(f"{cfg.preset}: {where}\n{summary(model)}")
    return model


def main(cfg: TrainConfig, notes=()) -> dict:
    """Train (and evaluate) as cfg says; returns {"steps", "loss", "skipped", "eval", "model"}."""
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    for note in notes:
        say(f"note: {note}")
    if cfg.dry_run:
        dry_run(cfg, device)
        return {}
    if cfg.dataset == "shapes":  # generated on first use, by one process
        if rank == 0:
            data.shapes.ensure(cfg.data_path)
        if dist.is_initialized():
            dist.barrier()
    check_inputs(cfg)
    ckpt = read_resume(cfg) if cfg.resume else None
    if cfg.accum_iter == 0 and cfg.effective_batch % (cfg.batch_size * world):
        raise UsageError(f"effective batch {cfg.effective_batch} is not a multiple of batch_size {cfg.batch_size} "
                         f"x {world} processes: set --accum_iter or --effective_batch")
    accum = cfg.accum_iter or cfg.effective_batch // (cfg.batch_size * world)
    global_batch = cfg.batch_size * accum * world
    lr = cfg.blr * global_batch / 256

    dtype = pick_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank
    model, tok = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(cfg), dtype=dtype, device=device,
                            max_seq_len=cfg.max_seq_len)
    model.llama.grad_checkpointing = model.visual.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        for block in [*model.llama.layers, *model.visual.transformer.resblocks]:
            block.compile()

    ds = data.build_dataset(cfg.dataset, cfg.data_path, "train", tok, prompt_format=cfg.prompt_format,
                            max_seq_len=cfg.max_seq_len, reserve=model.n_inserted, image_mode=cfg.image_mode,
                            resolution=model.visual.resolution)
    n_bad = check_images(ds, cfg.skip_bad_images, rank, world)
    if n_bad:
        say(f"skipping {n_bad} samples whose image cannot be read")
    sampler = data.LengthGroupedBatchSampler(ds.lengths, cfg.batch_size, rank=rank, world_size=world,
                                             seed=cfg.seed, drop_last=True)  # the official loop drops it too
    steps_per_epoch = len(sampler) // accum  # a partial accumulation window at the epoch's end is dropped
    if steps_per_epoch == 0:
        raise UsageError(f"a step of batch_size {cfg.batch_size} x accum_iter {accum} x {world} processes = "
                         f"{global_batch} samples does not fit in the {len(ds)} samples of {ds.name}")
    total = steps_per_epoch * cfg.epochs
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    opt = make_optimizer(model, cfg, lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    step, skipped = 0, 0
    if ckpt is not None:
        if ckpt.get("global_batch") != global_batch or ckpt.get("steps_per_epoch") != steps_per_epoch:
            raise UsageError(f"--resume {cfg.resume}: its run had {ckpt.get('global_batch')} samples per step and "
                             f"{ckpt.get('steps_per_epoch')} steps per epoch, this one {global_batch} and "
                             f"{steps_per_epoch}: resume with the same batch settings")
        try:
            load_trainable(model, ckpt["model"], source=cfg.resume)
        except (KeyError, ValueError) as e:
            raise UsageError(f"--resume: {e}") from None
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped = ckpt["step"], ckpt.get("skipped", 0)
        rng = ckpt["rng"][rank] if ckpt["world_size"] == world else ckpt["rng"][0]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        say(f"resumed from {cfg.resume} at step {step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks

    ddp = model
    if world > 1:
        # Only the adapters train: the frozen weights are read from the same files by every rank,
        # so DDP neither broadcasts nor watches them.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{cfg.preset} on {cfg.dataset} ({len(ds)} samples): {n_train:,} trainable parameters, {world} process(es) "
        f"on {device.type} in {str(dtype).split('.')[-1]}, effective batch {global_batch} "
        f"({cfg.batch_size} x {accum} accum x {world}), lr {lr:.3g}, {steps_per_epoch} steps/epoch, "
        f"{stop} steps from {step}")
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    extra = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch}
    if rank == 0 and ckpt is not None and (out / "log.jsonl").is_file():
        # Steps logged after the checkpoint (before a crash) are run again: keep one line each.
        rows = (out / "log.jsonl").read_text().splitlines()
        (out / "log.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", step + 1) <= step))
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=step, desc="training", unit="step", disable=rank != 0, dynamic_ncols=True)
    model.train()
    loss_value = float("nan")
    while step < stop:
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        # A generator of its own: making the iterator must not draw from the global RNG (dropout),
        # or a resumed run would diverge from the uninterrupted one.
        loader = DataLoader(ds, batch_sampler=SkipBatches(sampler, first * accum), collate_fn=ds.collate,
                            num_workers=workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = iter(loader)
        for i in range(first, steps_per_epoch):
            if step >= stop:
                break
            t0 = time.perf_counter()
            # set at the first micro-step of the window, from the fractional epoch, as the official loop
            lr_now = lr_at(epoch + i * accum / len(sampler), cfg, lr)
            for group in opt.param_groups:
                group["lr"] = lr_now
            micro = [next(batches) for _ in range(accum)]
            try:
                loss_value = train_step(ddp, micro, opt, scaler, autocast, device, world)
            except torch.cuda.OutOfMemoryError:
                raise UsageError(f"batch_size {cfg.batch_size} does not fit in GPU memory (the longest batch comes "
                                 f"first): lower --batch_size (--accum_iter keeps the effective batch) or add "
                                 f"--grad_checkpointing") from None
            skipped += not math.isfinite(loss_value)
            step += 1
            rate = global_batch / (time.perf_counter() - t0)
            if log:
                log.write(json.dumps({"step": step, "epoch": round(epoch + (i + 1) / steps_per_epoch, 4),
                                      "loss": loss_value if math.isfinite(loss_value) else None, "lr": lr_now,
                                      "samples_per_s": round(rate, 2),
                                      **({} if math.isfinite(loss_value) else {"skipped": True})}) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", samples_s=f"{rate:.1f}", refresh=False)
            bar.update()
            end_of_epoch = i == steps_per_epoch - 1
            if step == stop or end_of_epoch or (cfg.save_interval and step % cfg.save_interval == 0):
                save_checkpoint(out, model, opt, scaler, step, cfg, rank, world, device, {**extra, "skipped": skipped})
    bar.close()
    if skipped:
        say(f"warning: {skipped} step(s) had a NaN or inf loss and were skipped on every rank")
    result = {"steps": step, "loss": loss_value, "skipped": skipped, "eval": None, "model": model}
    if not cfg.skip_eval:
        from sample import evaluate_split

        model.eval()
        result["eval"] = evaluate_split(
            model, tok, dataset_name=cfg.dataset, data_path=cfg.data_path, split=cfg.eval_split,
            prompt_format=cfg.prompt_format, batch_size=cfg.eval_batch_size, output_dir=str(out),
            image_mode=cfg.image_mode, rank=rank, world_size=world, device=device,
            autocast_dtype=None if dtype == torch.float32 else dtype)
        if log:
            log.write(json.dumps({"eval": result["eval"]}) + "\n")
        if rank == 0:
            show_samples(cfg, out)
    if log:
        log.close()
        say(f"wrote {out / 'log.jsonl'}, {out / 'checkpoint.pth'}, {out / 'adapters.pth'}"
            + ("" if cfg.skip_eval else f", {out / 'results.json'}"))
    return result


if __name__ == "__main__":
    try:
        cfg, notes = make_config()
        main(cfg, notes)
    except (UsageError, FileNotFoundError, data.scienceqa.DataError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
