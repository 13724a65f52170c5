"""COCO Captions in Karpathy's split: the paper's captioning setting.

    {root}/dataset_coco.json   {"images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg",
                                            "split": "train" | "restval" | "val" | "test", "cocoid": 391895,
                                            "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]}, ...]}
    {root}/{filepath}/{filename}    the pictures (train2014/, val2014/)
        │
        ├─> training (split "train": train + restval, 113k images): one sample per reference,
        │     (CAPTION_PROMPT, the raw sentence stripped), with its picture
        └─> evaluation (val / test, 5,000 images each): CAPTION_PROMPT per image, the generated
              caption scored against the image's references (data/captions.py's Evaluation)

The prompt is the chatbot's instruction template around one fixed request (ours: the paper does
not print its captioning prompt).
"""
from __future__ import annotations

import os

from data.batching import Sample
from data.instruct import instruction_prompt
from data.scienceqa import DataError, load_json

DEFAULT_ROOT = "data/coco"
SPLITS = ("train", "restval", "val", "test")
CAPTION_PROMPT = instruction_prompt("Describe the image in one sentence.")


def read_karpathy(root: str) -> list[dict]:
    """The images of dataset_coco.json, each checked: a bad entry is an error that names it."""
    path = os.path.join(root, "dataset_coco.json")
    release = load_json(path)
    images = release.get("images") if isinstance(release, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected {{\"images\": [...]}} (Karpathy's split file)")
    for i, e in enumerate(images):
        name = f"{path}: image {e.get('cocoid', '#' + str(i)) if isinstance(e, dict) else '#' + str(i)}"
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("filepath", "filename", "split")) \
                or "cocoid" not in e:
            raise DataError(f"{name}: needs filepath, filename, split and cocoid")
        if e["split"] not in SPLITS:
            raise DataError(f"{name}: unknown split {e['split']!r} (expected one of {', '.join(SPLITS)})")
        sentences = e.get("sentences")
        if not isinstance(sentences, list) or not sentences \
                or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()
                           for s in sentences):
            raise DataError(f"{name}: needs a non-empty list of sentences, each with its 'raw' caption")
    return images


def images_of(images: list[dict], split: str) -> list[dict]:
    """The images of a split; "train" is Karpathy's train + restval, as captioning papers train."""
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}: use train (train + restval), val or test")
    wanted = ("train", "restval") if split == "train" else (split,)
    return [e for e in images if e["split"] in wanted]


def image_path(root: str, entry: dict) -> str:
    return os.path.join(root, entry["filepath"], entry["filename"])


def references_of(images: list[dict], split: str) -> dict[str, list[str]]:
    """{cocoid as a string: the raw reference captions} of a split."""
    return {str(e["cocoid"]): [s["raw"] for s in e["sentences"]] for e in images_of(images, split)}


def check_images(root: str, entries: list[dict]) -> None:
    for e in entries:
        if not os.path.isfile(image_path(root, e)):
            raise DataError(f"image {e['cocoid']}: {image_path(root, e)} does not exist")


def load_samples(root: str = DEFAULT_ROOT, split: str = "train", check: bool = True) -> list[Sample]:
    """Training samples: one (prompt, reference) per reference caption, with its picture."""
    entries = images_of(read_karpathy(root), split)
    if check:
        check_images(root, entries)
    return [Sample(f"{e['cocoid']}_{j}", ((CAPTION_PROMPT, s["raw"].strip()),), image_path(root, e))
            for e in entries for j, s in enumerate(e["sentences"])]
