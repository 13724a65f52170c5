"""`shapes-chat`: the chatbot's data at laptop size, in the real formats, from the shapes pictures.

The LaVIN chatbot (paper, section 4) is a Vicuna taught to see on LLaVA-Instruct (COCO pictures)
and Alpaca (text only), and scored on MME. This module writes a stand-in for each of those files:

    pictures of data/shapes.py (one shape in the middle, k equal shapes, or one by a side)
      ├─> train2014/COCO_train2014_{id:012d}.jpg            where the loader expects COCO's
      ├─> detail_23k.json             "Describe the picture."         -> "A red circle in the middle."
      ├─> complex_reasoning_77k.json  one question (open, or yes/no)  -> a short answer
      ├─> conversation_58k.json       three turns about the picture   -> (loss on every answer)
      └─> mme/{color,count}/*.jpg + *.txt, mme/{position,existence}/images/ + questions_answers_YN/
            held-out pictures, two yes/no questions each (in random order), MME's layouts
    text problems of data/shapes.py (weather, towns, toys, polygons, directions, word groups)
      └─> alpaca_data.json (train), alpaca_test.json (held out): {instruction, input, output}
    + tokenizer.model, vicuna/ (the tiny LLaMA instruction-tuned on such text, as Vicuna is a
      LLaMA instruction-tuned), clip/ViT-tiny.pt: copies of data/shapes_backbones

    python -m data.shapes_chat [--root data/shapes-chat] [--seed 0]      a few seconds
    ensure(root)   # the same, once, if the set is not there yet
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from data import shapes

YES_NO = " Please answer yes or no."  # MME's question suffix
NUMBER = ["zero", "one", "two", "three", "four"]
PICTURES, TEST_PICTURES, ALPACA, ALPACA_TEST = 1000, 40, 1500, 300  # per subtask for TEST_PICTURES
BACKBONE_FILES = ("tokenizer.model", "vicuna/params.json", "vicuna/consolidated.00.pth", "clip/ViT-tiny.pt",
                  "backbones.json")
DESCRIBE = ["Describe the picture.", "What do you see in the image?", "What does the picture show?"]
TEXT_FAMILIES = (shapes.txt_weather, shapes.txt_town, shapes.txt_toy, shapes.fact_sides, shapes.fact_direction,
                 shapes.fact_word)


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------- pictures and questions

def picture(rng: random.Random) -> tuple[list, dict]:
    """A scene and what can be asked of it: shape, colour, count k, place (middle or a side)."""
    kind = rng.choices(["middle", "count", "side"], [1, 1, 1])[0]
    if kind == "count":
        k = rng.randint(1, 4)
        scene, place = shapes.count_scene(rng, k, rng.choice(shapes.SHAPES)), None
    elif kind == "side":
        place = rng.choice(list(shapes.SIDES_AT))
        scene = shapes.side_scene(rng, place)
    else:
        scene, place = shapes.single_scene(rng), "middle"
    return scene, {"shape": scene[0][0], "color": scene[0][1], "k": len(scene), "place": place}


def caption(f: dict) -> str:
    """What a picture shows, in one sentence: what the tiny LLaMA reads in place of it."""
    if f["place"] is None:
        return f"{cap(NUMBER[f['k']])} {f['color']} {f['shape']}{'s' if f['k'] > 1 else ''}."
    where = "in the middle" if f["place"] == "middle" else f"on the {f['place']}"
    return f"{cap(shapes.a(f['color']))} {f['shape']} {where}."


def open_question(rng: random.Random, f: dict) -> tuple[str, str]:
    kinds = ["color", "count" if f["place"] is None else "shape"] + ([] if f["place"] is None else ["place"])
    kind = rng.choice(kinds)
    noun = "shapes are" if f["k"] > 1 else "shape is"
    if kind == "color":
        return f"What color {'are the shapes' if f['k'] > 1 else 'is the shape'}?", f"The {noun} {f['color']}."
    if kind == "count":
        return f"How many {f['shape']}s are there?", f"There {'is' if f['k'] == 1 else 'are'} {NUMBER[f['k']]}."
    if kind == "shape":
        return "Which shape is in the picture?", f"It is {shapes.a(f['shape'])}."
    where = "in the middle" if f["place"] == "middle" else f"on the {f['place']}"
    return f"Where is the {f['shape']}?", f"It is {where}."


def yes_no_question(rng: random.Random, f: dict, kind: str, yes: bool) -> tuple[str, str]:
    """A question of an MME subtask (color, count, position, existence) whose answer is yes or no."""
    if kind == "color":
        c = f["color"] if yes else rng.choice([c for c in shapes.COLORS if c != f["color"]])
        q, be = (f"Is the {f['shape']} {c}?", "it is") if f["k"] == 1 else (f"Are the {f['shape']}s {c}?", "they are")
        return q + YES_NO, f"Yes, {be} {c}." if yes else f"No, {be} {f['color']}."
    if kind == "count":
        k = f["k"] if yes else rng.choice([k for k in range(1, 5) if k != f["k"]])
        q = f"Is there one {f['shape']} in the picture?" if k == 1 else \
            f"Are there {NUMBER[k]} {f['shape']}s in the picture?"
        return q + YES_NO, f"Yes, there {'is' if k == 1 else 'are'} {NUMBER[k]}." if yes \
            else f"No, there {'is' if f['k'] == 1 else 'are'} {NUMBER[f['k']]}."
    if kind == "position":
        places = ["middle", *shapes.SIDES_AT]
        p = f["place"] if yes else rng.choice([p for p in places if p != f["place"]])
        where = {"middle": "in the middle"}.get(p, f"on the {p}")
        actual = {"middle": "in the middle"}.get(f["place"], f"on the {f['place']}")
        return f"Is the {f['shape']} {where} of the picture?" + YES_NO, \
            f"Yes, it is {where}." if yes else f"No, it is {actual}."
    s = f["shape"] if yes else rng.choice([s for s in shapes.SHAPES if s != f["shape"]])
    return f"Is there {shapes.a(s)} in the picture?" + YES_NO, \
        f"Yes, there is {shapes.a(s)}." if yes else f"No, there is no {s}."


def subtasks_of(f: dict) -> list[str]:
    return ["color", "existence"] + (["count"] if f["place"] is None else ["position"])


def any_question(rng: random.Random, f: dict) -> tuple[str, str]:
    """An open question or a yes/no one (half and half), about a picture with features f."""
    if rng.random() < 0.5:
        return open_question(rng, f)
    return yes_no_question(rng, f, rng.choice(subtasks_of(f)), rng.random() < 0.5)


def text_instruction(rng: random.Random) -> dict:
    """An Alpaca entry from a text problem of data/shapes.py: the question, its context, the answer."""
    family = rng.choice(TEXT_FAMILIES)
    hint, question, answer, choices, *_ = family(rng, False)
    if family is shapes.fact_word:  # many words name an animal: the choices make one answer right
        hint = f"Choose from: {', '.join(choices)}."
    return {"instruction": question, "input": hint, "output": cap(answer) + "."}


def with_marker(rng: random.Random, text: str) -> str:
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"  # LLaVA puts it either side


# ----------------------------------------------------------------------------- the files

def write_llava(root: Path, rng: random.Random, n: int) -> None:
    """The three LLaVA-Instruct files and their pictures; every picture is in each file."""
    files = {"detail_23k.json": [], "complex_reasoning_77k.json": [], "conversation_58k.json": []}
    (root / "train2014").mkdir()
    for i in range(n):
        scene, f = picture(rng)
        image = f"{i + 1:012d}.jpg"
        shapes.render(scene).save(root / "train2014" / f"COCO_train2014_{image}", format="JPEG", quality=95)

        def conv(pairs):
            pairs = [(with_marker(rng, pairs[0][0]), pairs[0][1]), *pairs[1:]]
            return {"id": image[:-4], "image": image,
                    "conversations": [t for h, g in pairs for t in ({"from": "human", "value": h},
                                                                    {"from": "gpt", "value": g})]}
        files["detail_23k.json"].append(conv([(rng.choice(DESCRIBE), caption(f))]))
        files["complex_reasoning_77k.json"].append(conv([any_question(rng, f)]))
        turns = {}
        while len(turns) < 3:  # three different questions
            q, answer = any_question(rng, f)
            turns.setdefault(q, answer)
        files["conversation_58k.json"].append(conv(list(turns.items())))
    for name, entries in files.items():
        (root / name).write_text(json.dumps(entries, indent=1) + "\n")


def write_mme(root: Path, rng: random.Random, n: int) -> None:
    """n held-out pictures per subtask, a yes and a no question each, in random order; color and
    count beside their .txt, position and existence in images/ + questions_answers_YN/."""
    for kind in ("color", "count", "position", "existence"):
        folder = root / kind
        split = kind in ("position", "existence")
        images, texts = (folder / "images", folder / "questions_answers_YN") if split else (folder, folder)
        images.mkdir(parents=True)
        texts.mkdir(exist_ok=True)
        done = 0
        while done < n:
            scene, f = picture(rng)
            if kind not in subtasks_of(f):
                continue
            lines = [(yes_no_question(rng, f, kind, yes)[0], "Yes" if yes else "No") for yes in (True, False)]
            rng.shuffle(lines)
            name = f"{kind}_{done:04d}"
            shapes.render(scene).save(images / f"{name}.jpg", format="JPEG", quality=95)
            (texts / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in lines))
            done += 1


def generate(root="data/shapes-chat", seed: int = 0, pictures: int = PICTURES, backbones=shapes.BACKBONES,
             quiet: bool = False) -> Path:
    """Write the set to root (replacing an earlier one there) with a copy of the tiny backbones
    (shapes.write_set)."""
    def write(folder: Path):
        rng = random.Random(seed + 31337)  # another stream than the backbones' corpus
        write_llava(folder, rng, pictures)
        for name, k in (("alpaca_data.json", ALPACA), ("alpaca_test.json", ALPACA_TEST)):
            (folder / name).write_text(json.dumps([text_instruction(rng) for _ in range(k)], indent=1) + "\n")
        write_mme(folder / "mme", rng, TEST_PICTURES)

    t0 = time.time()
    root = shapes.write_set(root, "shapes-chat", "alpaca_data.json", write, backbones, BACKBONE_FILES)
    if not quiet:
        print(f"shapes-chat: {pictures} pictures x 3 LLaVA files, {ALPACA} + {ALPACA_TEST} text instructions, "
              f"MME set of 4 x {TEST_PICTURES} pictures, tiny backbones -> {root} ({time.time() - t0:.1f}s)",
              flush=True)
    return root


def ensure(root="data/shapes-chat", **kwargs) -> Path:
    """The set at root, generated first if it is not there (build_dataset calls this)."""
    if not all((Path(root) / f).is_file() for f in ("alpaca_data.json", "conversation_58k.json", *BACKBONE_FILES)):
        generate(root, **kwargs)
    return Path(root)


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--root", default="data/shapes-chat", help="output folder (replaced if it holds a set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pictures", type=int, default=PICTURES, help="training pictures")
    ap.add_argument("--backbones", default=str(shapes.BACKBONES), help="folder of the tiny backbones to copy")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    generate(args.root, args.seed, args.pictures, args.backbones)


if __name__ == "__main__":
    main()
