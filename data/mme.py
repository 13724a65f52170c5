"""MME (Fu et al., 2023): yes/no questions about images, the benchmark the LaVIN chatbot is scored on.

The release holds one folder per subtask, in one of two layouts, and two questions per image:

    {root}/count/000000012345.jpg + 000000012345.txt          (image and questions side by side)
    {root}/artwork/images/10002.jpg + questions_answers_YN/10002.txt
    each .txt: two lines "question<TAB>Yes|No" (one question answered yes, one no, in any order)
        │
        ▼  prompt "Instruction: {question}\\nResponse:" (the chatbot's template), at most 20 new tokens
    response ─ lower case: "yes" in its first 4 characters -> yes, else "no" there -> no, else wrong
        │
        ▼  per subtask: acc (questions right, %) and acc+ (images with both right, %)
    perception = sum of acc + acc+ over the 10 perception subtasks, cognition over the 4 others

As the official eval_mme.py, except that each line's answer is read from its own answer column
(eval_mme.py assumes the first line is the "yes" one). The scoring runs without a model too:

    python -m data.mme --data DIR --preds preds.json [--out results.json]
    preds.json: {"<subtask>/<image file name>": [response to line 1, response to line 2]}
"""
from __future__ import annotations

import argparse
import os
import sys

from data.instruct import instruction_prompt
from data.scienceqa import DataError, load_json, save_json

PERCEPTION = ("existence", "count", "position", "color", "OCR", "posters", "celebrity", "scene", "landmark",
              "artwork")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAX_NEW_TOKENS = 20  # eval_mme.py's


def read_questions(path: str) -> list[tuple[str, str]]:
    """The two (question, "yes" | "no") lines of a .txt, in order."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    if len(lines) != 2:
        raise DataError(f"{path}: expected two lines 'question<TAB>Yes|No', found {len(lines)}")
    pairs = []
    for line in lines:
        question, tab, answer = line.rpartition("\t")
        if not tab or answer.strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}: a line should end in a tab and Yes or No, got {line!r:.120}")
        pairs.append((question.strip(), answer.strip().lower()))
    return pairs


def subtask_files(folder: str) -> list[tuple[str, str]]:
    """(image path, .txt path) of each image of one subtask folder, sorted by file name."""
    split = os.path.isdir(os.path.join(folder, "images"))
    images_dir = os.path.join(folder, "images") if split else folder
    txt_dir = os.path.join(folder, "questions_answers_YN") if split else folder
    if split and not os.path.isdir(txt_dir):
        raise DataError(f"{folder}: has images/ but no questions_answers_YN/")
    names = sorted(os.listdir(images_dir))
    images = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)}
    texts = sorted(n for n in os.listdir(txt_dir) if n.endswith(".txt"))
    for n in texts:
        if n[:-4] not in images:
            raise DataError(f"{os.path.join(txt_dir, n)}: no image of that name beside it")
    files = []
    for stem, name in sorted(images.items(), key=lambda kv: kv[1]):
        txt = os.path.join(txt_dir, stem + ".txt")
        if not os.path.isfile(txt):
            raise DataError(f"{os.path.join(images_dir, name)}: no questions for it (expected {txt})")
        files.append((os.path.join(images_dir, name), txt))
    return files


def read_release(root: str) -> dict[str, dict[str, dict]]:
    """{subtask: {image file name: {"image": path, "questions": [(question, answer), (..)]}}} for
    every subtask folder under root (a folder with neither images nor .txt files is skipped)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no MME release at {root}: expected one folder per subtask (count/, color/, "
                                f"artwork/images/ + artwork/questions_answers_YN/, ...); pass --data_path")
    release = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = subtask_files(folder)
        if files:
            release[name] = {os.path.basename(img): {"image": img, "questions": read_questions(txt)}
                             for img, txt in files}
    if not release:
        raise DataError(f"{root}: no subtask folder with images and their .txt questions")
    return release


# ----------------------------------------------------------------------------- scoring

def parse_yes_no(response: str) -> str:
    """"yes", "no" or "other", as MME's evaluation reads a response: its first 4 characters."""
    text = response.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score(release: dict, preds: dict[str, list[str]]) -> dict:
    """results.json's dict (percentages, 2 decimals) from {subtask/image: [response, response]}."""
    check_predictions(release, preds)
    subtasks, unparsed = {}, 0
    for name, images in release.items():
        right = both = 0
        for image, entry in images.items():
            parsed = [parse_yes_no(r) for r in preds[f"{name}/{image}"]]
            unparsed += parsed.count("other")
            ok = [p == answer for p, (_, answer) in zip(parsed, entry["questions"])]
            right, both = right + sum(ok), both + all(ok)
        n_questions = sum(len(e["questions"]) for e in images.values())
        subtasks[name] = {"acc": round(100 * right / n_questions, 2), "acc_plus": round(100 * both / len(images), 2)}

    def total(names):
        return round(sum(subtasks[n]["acc"] + subtasks[n]["acc_plus"] for n in names if n in subtasks), 2)

    perception, cognition = total(PERCEPTION), total(COGNITION)
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition,
            "total": round(perception + cognition, 2), "unparsed": unparsed,
            "questions": sum(len(e["questions"]) for images in release.values() for e in images.values())}


def check_predictions(release: dict, preds: dict):
    """Every image of the release needs its list of responses, one per question: the images
    without one are counted and the first few named, as are malformed entries."""
    missing, malformed = [], []
    for name, images in release.items():
        for image, entry in images.items():
            key, n = f"{name}/{image}", len(entry["questions"])
            responses = preds.get(key)
            if responses is None:
                missing.append(key)
            elif not isinstance(responses, list) or len(responses) != n or not all(isinstance(r, str) for r in responses):
                malformed.append(f"{key} should be a list of {n} responses, got {responses!r:.60}")
    n_images = sum(len(images) for images in release.values())
    if missing:
        raise DataError(f"the predictions have no responses for {len(missing)} of the {n_images} images: "
                        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    if malformed:
        raise DataError(f"{len(malformed)} of the {n_images} images have malformed responses: {malformed[0]}"
                        + (f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""))


def format_table(result: dict) -> str:
    rows = [f"MME: {len(result['subtasks'])} subtasks, {result['questions']} questions, "
            f"{result['unparsed']} answers neither yes nor no (counted wrong)",
            f"{'subtask':<22}{'acc':>8}{'acc+':>8}{'score':>8}"]
    for name, r in result["subtasks"].items():
        kind = "" if name in PERCEPTION else "  (cognition)" if name in COGNITION else "  (in neither sum)"
        rows.append(f"{name:<22}{r['acc']:8.2f}{r['acc_plus']:8.2f}{r['acc'] + r['acc_plus']:8.2f}{kind}")
    rows.append(f"perception {result['perception']:.2f}, cognition {result['cognition']:.2f}, "
                f"total {result['total']:.2f}")
    return "\n".join(rows)


class Evaluation:
    """MME for evaluate.py: one prompt per question, its image, the early stop and the table."""

    name, split, max_new_tokens = "mme", "", MAX_NEW_TOKENS

    def __init__(self, root: str, tokenizer, image_mode: str = "lavin", resolution: int = 224):
        from data.batching import Sample, TokenizedDataset

        self.root, self.release = root, read_release(root)
        samples = [Sample(f"{name}/{image}#{j}", ((instruction_prompt(q), ""),), entry["image"])
                   for name, images in self.release.items() for image, entry in images.items()
                   for j, (q, _) in enumerate(entry["questions"])]
        self.dataset = TokenizedDataset(samples, tokenizer, image_mode=image_mode, resolution=resolution,
                                        name="mme")

    def stop(self, text: str) -> bool:
        """Only the first 4 characters are read: once there are 4, or a first word has ended."""
        text = text.lstrip()
        return len(text) >= 4 or (text != "" and not text.isalnum())

    def score(self, texts: dict) -> tuple[dict, dict]:
        preds = {}
        for pid, text in texts.items():
            key, j = pid.rsplit("#", 1)
            preds.setdefault(key, [None, None])[int(j)] = text
        return {"dataset": "mme", **score(self.release, preds)}, {"preds.json": preds}

    def table(self, result: dict) -> str:
        return format_table(result)


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description="Score MME responses: acc, acc+, perception and cognition.",
                                 allow_abbrev=False)
    ap.add_argument("--data", required=True, help="the MME release folder (one folder per subtask)")
    ap.add_argument("--preds", required=True, help='JSON {"<subtask>/<image file name>": [response, response]}')
    ap.add_argument("--out", help="write results.json here")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    preds = load_json(args.preds)
    if not isinstance(preds, dict):
        raise DataError(f"{args.preds}: expected an object '<subtask>/<image file name>' -> [response, response]")
    result = score(read_release(args.data), preds)
    print(format_table(result))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
