"""Data for LaVIN: one entry point for the six datasets the training loop knows (three real ones,
each with a synthetic twin in its format).

    build_dataset("scienceqa", root, split, tokenizer)  ScienceQA release (paper, Table 1)
    build_dataset("shapes", root, split, tokenizer)     synthetic set in ScienceQA's layout,
                                                        read by the very same reader
    build_dataset("instruct", root, "train", tokenizer) LLaVA-Instruct + Alpaca (the chatbot)
    build_dataset("shapes-chat", root, "train", tok)    synthetic set in their formats, same reader
    build_dataset("coco", root, "train", tokenizer)     COCO captions, Karpathy's split (train + restval)
    build_dataset("shapes-coco", root, "train", tok)    synthetic set in its format, same reader
        │
        ▼  scienceqa / instruct / coco .load_samples -> [Sample] (validated up front)
    batching.TokenizedDataset: items {"pid", "tokens", "labels", "image" | None};
        .lengths for LengthGroupedBatchSampler, .collate for the DataLoader (batch fields in
        data/batching.py)

    # reserve: positions the model inserts after BOS (LaVIN.n_inserted: "Image: " and 6 visual tokens,
    # or "Image: N/A"; the modality token is not in the sequence)
    ds = build_dataset("scienceqa", None, "train", tokenizer, max_seq_len=512, reserve=n_extra)
    sampler = LengthGroupedBatchSampler(ds.lengths, 4, rank=rank, world_size=world, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)

    evaluation(name, root, split, tokenizer) -> the task evaluate.py runs: scienceqa / shapes (the
    accuracy table, data/table.py), mme (yes/no questions, data/mme.py), alpaca (held-out text-only
    instructions, data/instruct.py), coco (BLEU and CIDEr-D of captions, data/coco.py + data/captions.py)
"""
from __future__ import annotations

import importlib.util
import os

from data import coco, instruct, scienceqa
from data.batching import (IGNORE_INDEX, PAD_ID, Collator, LengthGroupedBatchSampler, Sample, SkipBatches,
                           TokenizedDataset, encode_turns)

DATASETS = ("scienceqa", "shapes", "instruct", "shapes-chat", "coco", "shapes-coco")  # what train.py trains on
CHAT_DATASETS = ("instruct", "shapes-chat")  # the chatbot's instruction data (data/instruct.py's reader)
CAPTION_DATASETS = ("coco", "shapes-coco")  # Karpathy's COCO split (data/coco.py's reader)
EVAL_DATASETS = ("scienceqa", "shapes", "mme", "alpaca", "coco")  # those with an evaluation (evaluate.py)
DEFAULT_ROOTS = {"scienceqa": scienceqa.DEFAULT_ROOT, "shapes": "data/shapes", "instruct": instruct.DEFAULT_ROOT,
                 "shapes-chat": "data/shapes-chat", "mme": "data/mme", "alpaca": instruct.DEFAULT_ROOT,
                 "coco": "data/coco", "shapes-coco": "data/shapes-coco"}
SYNTHETIC = {"shapes": ("data.shapes", "problems.json"), "shapes-chat": ("data.shapes_chat", "alpaca_data.json"),
             "shapes-coco": ("data.shapes_coco", "dataset_coco.json")}
# what a run on each training set is scored on at its end (train.py) and by default (sample.py --run)
EVAL_OF = {"scienceqa": "scienceqa", "shapes": "shapes", "instruct": "mme", "shapes-chat": "mme", "coco": "coco",
           "shapes-coco": "coco"}

__all__ = ["build_dataset", "evaluation", "ensure", "DATASETS", "CHAT_DATASETS", "EVAL_DATASETS", "IGNORE_INDEX",
           "PAD_ID", "Collator", "LengthGroupedBatchSampler", "Sample", "SkipBatches", "TokenizedDataset",
           "encode_turns"]


def ensure(name: str, root: str) -> None:
    """A synthetic set (shapes, shapes-chat): written on first use into its default folder (a
    mistyped --data_path gets an error, not a new set)."""
    if name not in SYNTHETIC:
        return
    module, marker = SYNTHETIC[name]
    if os.path.isfile(os.path.join(root, marker)):
        return
    if os.path.normpath(root) != os.path.normpath(DEFAULT_ROOTS[name]):
        raise FileNotFoundError(f"no {name} set in {root}: only the default {DEFAULT_ROOTS[name]} is written "
                                f"on first use; write one there with  python -m {module} --root {root}")
    found = importlib.import_module(module) if importlib.util.find_spec(module) else None
    if found is None or not hasattr(found, "ensure"):
        raise FileNotFoundError(f"no synthetic set in {root}: run  python -m {module} --root {root}")
    found.ensure(root)


def build_dataset(name: str, root: str | None, split: str, tokenizer, *,
                  prompt_format: str = scienceqa.DEFAULT_FORMAT, use_caption: bool = False,
                  instruct_mode: str = "recipe", coco_root: str = "",
                  max_seq_len: int | None = None, reserve: int = 0, image_mode: str = "lavin",
                  resolution: int = 224, image_loader=None, check_images: bool = True) -> TokenizedDataset:
    """A tokenised torch Dataset; bad input raises here, naming the file or the pid.

    root None -> the dataset's default folder. ScienceQA/shapes options: prompt_format,
    use_caption. instruct / shapes-chat options: instruct_mode ("recipe" | "multiturn"), coco_root
    ("" = {root}/train2014); their only split is "train". max_seq_len/reserve: see
    TokenizedDataset. image_mode, resolution: passed to clip.preprocess ("lavin" matches the
    released weights, "clip" is CLIP's own).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    root = root or DEFAULT_ROOTS[name]
    ensure(name, root)
    if name in CHAT_DATASETS:
        if split != "train":
            raise ValueError(f"the instruction data has only a 'train' split, not {split!r}")
        samples = instruct.load_samples(root, coco_root or os.path.join(root, "train2014"), instruct_mode,
                                        check_images)
    elif name in CAPTION_DATASETS:
        samples = coco.load_samples(root, split, check_images)
    else:
        samples = scienceqa.load_samples(root, split, prompt_format, use_caption, check_images)
    return TokenizedDataset(samples, tokenizer, max_seq_len=max_seq_len, reserve=reserve,
                            image_mode=image_mode, resolution=resolution, image_loader=image_loader,
                            name=f"{name}/{split}")


def evaluation(name: str, root: str | None, split: str, tokenizer, *, prompt_format: str = scienceqa.DEFAULT_FORMAT,
               image_mode: str = "lavin", resolution: int = 224):
    """The evaluation task of a dataset's split, for evaluate.py: its prompts and images, early
    stop, scoring and table. Bad input raises here, naming the file or the pid."""
    if name not in EVAL_DATASETS:
        raise ValueError(f"cannot evaluate on {name!r}: use one of {', '.join(EVAL_DATASETS)}")
    from data import captions, mme, table

    root = root or DEFAULT_ROOTS[name]
    ensure(name, root)
    if name == "mme":
        return mme.Evaluation(root, tokenizer, image_mode=image_mode, resolution=resolution)
    if name == "alpaca":
        return instruct.TextEvaluation(root, split, tokenizer)
    if name == "coco":
        return captions.Evaluation(root, split, tokenizer, image_mode=image_mode, resolution=resolution)
    return table.Evaluation(name, root, split, tokenizer, prompt_format, image_mode=image_mode, resolution=resolution)
