"""`shapes-coco`: a caption set in Karpathy's COCO format, from the shapes pictures.

    pictures of data/shapes_chat.picture (one shape in the middle, k equal shapes, one by a side)
      ├─> train2014/COCO_train2014_{cocoid:012d}.jpg (train, restval), val2014/... (val, test)
      └─> dataset_coco.json: {"images": [{filepath, filename, split, cocoid, imgid, sentid...,
            sentences: [{raw, tokens, imgid, sentid}, ...]}], "dataset": "coco"}, five references
            per picture worded differently (colour, shape, count, position)
    + tokenizer.model, vicuna/, clip/ViT-tiny.pt: copies of data/shapes_backbones (the instruction-tuned
      tiny LLaMA: it has read descriptions of pictures as answers, as a real LLaMA has read captions;
      the ScienceQA one has read them only in place of a picture, and learns no caption in minutes)

    python -m data.shapes_coco [--root data/shapes-coco] [--seed 0]      a second
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from data import shapes, shapes_chat

SPLIT_SIZES = {"train": 1200, "restval": 300, "val": 100, "test": 200}  # pictures
BACKBONE_FILES = ("tokenizer.model", "vicuna/params.json", "vicuna/consolidated.00.pth", "clip/ViT-tiny.pt",
                  "backbones.json")


def references(rng: random.Random, f: dict) -> list[str]:
    """Five captions of a picture with features f, each worded its own way."""
    cap, a, number = shapes_chat.cap, shapes.a, shapes_chat.NUMBER[f["k"]]
    if f["place"] is None:  # k equal shapes
        plural = f"{f['shape']}s" if f["k"] > 1 else f["shape"]
        out = [f"{cap(number)} {f['color']} {plural}.", f"{cap(number)} {plural}, all {f['color']}.",
               f"There {'are' if f['k'] > 1 else 'is'} {number} {f['color']} {plural} on a white background.",
               f"A picture of {number} {f['color']} {plural}.", f"{cap(number)} {f['color']} {plural} in a grid."]
    else:
        where = "in the middle" if f["place"] == "middle" else f"on the {f['place']}"
        out = [f"{cap(a(f['color']))} {f['shape']} {where}.", f"{cap(a(f['shape']))} in {f['color']}, {where}.",
               f"There is {a(f['color'])} {f['shape']} {where} of the picture.",
               f"A picture of {a(f['color'])} {f['shape']}.", f"{cap(a(f['color']))} {f['shape']} on white."]
    rng.shuffle(out)
    return out


def write(root: Path, rng: random.Random) -> None:
    from data.captions import tokenize

    images, cocoid, sentid = [], 0, 0
    for split, n in SPLIT_SIZES.items():
        folder = "train2014" if split in ("train", "restval") else "val2014"
        (root / folder).mkdir(exist_ok=True)
        for _ in range(n):
            cocoid += 1
            scene, f = shapes_chat.picture(rng)
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            shapes.render(scene).save(root / folder / name, format="JPEG", quality=95)
            sentences = []
            for raw in references(rng, f):
                sentences.append({"tokens": tokenize(raw), "raw": raw, "imgid": cocoid - 1, "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": name,
                           "imgid": cocoid - 1, "split": split, "sentences": sentences, "cocoid": cocoid})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}) + "\n")


def generate(root="data/shapes-coco", seed: int = 0, backbones=shapes.BACKBONES, quiet: bool = False) -> Path:
    """Write the set to root (replacing an earlier one) with a copy of the tiny backbones
    (shapes.write_set)."""
    t0 = time.time()
    root = shapes.write_set(root, "shapes-coco", "dataset_coco.json",
                            lambda folder: write(folder, random.Random(seed + 271828)), backbones, BACKBONE_FILES)
    if not quiet:
        print(f"shapes-coco: {sum(SPLIT_SIZES.values())} pictures x 5 captions in Karpathy's format, tiny "
              f"backbones -> {root} ({time.time() - t0:.1f}s)", flush=True)
    return root


def ensure(root="data/shapes-coco", **kwargs) -> Path:
    if not all((Path(root) / f).is_file() for f in ("dataset_coco.json", *BACKBONE_FILES)):
        generate(root, **kwargs)
    return Path(root)


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--root", default="data/shapes-coco", help="output folder (replaced if it holds a set)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    generate(args.root, args.seed)


if __name__ == "__main__":
    main()
