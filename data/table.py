"""The ScienceQA accuracy table of the LaVIN paper (Table 1), on any split.

    predictions {pid: generated text | choice index}
        │  parse_answer: first match of "The answer is ([A-Z])." -> choice index, -1 if none
        ▼  or the letter is not one of the problem's choices
    preds {pid: index or -1}  (written as preds.json, the reference's format)
        │  score: problems.json + pid_splits.json[split]
        ▼
    NAT SOC LAN | TXT IMG NO | G1-6 G7-12 | Avg   (percent, 2 decimals) + the unparsed count

Columns as the ScienceQA evaluation defines them: subject natural/social/language science;
TXT: hint non-empty; IMG: image non-empty; NO: neither; G1-6 / G7-12: grade1..6 / grade7..12.
The reference guesses a random choice for an answer it cannot parse; we count it wrong and
report how many there were.

    python -m data.table --data data/scienceqa --split test --preds outputs.json [--out results.json]

`Evaluation` is what evaluate.py asks of a dataset, for ScienceQA and the shapes set: the split's
prompts and images, the early stop, the scoring and the table, from one reading of the release.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from data.scienceqa import (DEFAULT_ROOT, LETTERS, DataError, build_prompt, check_format, load_json, open_split,
                            read_release, samples_of, save_json, split_pids)

ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")  # the reference's pattern, "." unescaped
GRADES_1_6 = tuple(f"grade{g}" for g in range(1, 7))
GRADES_7_12 = tuple(f"grade{g}" for g in range(7, 13))
COLUMNS = (
    ("NAT", lambda p: p["subject"] == "natural science"),
    ("SOC", lambda p: p["subject"] == "social science"),
    ("LAN", lambda p: p["subject"] == "language science"),
    ("TXT", lambda p: bool(p["hint"])),
    ("IMG", lambda p: bool(p["image"])),
    ("NO", lambda p: not p["hint"] and not p["image"]),
    ("G1-6", lambda p: p["grade"] in GRADES_1_6),
    ("G7-12", lambda p: p["grade"] in GRADES_7_12),
    ("Avg", lambda p: True),
)


def parse_answer(text: str, n_choices: int) -> int:
    """Choice index read from generated text, -1 when there is none or it is not a choice."""
    found = ANSWER_PATTERN.findall(text)
    index = LETTERS.index(found[0]) if found else -1
    return index if index < n_choices else -1


def to_indices(raw: dict, problems: dict, pids: list[str]) -> dict[str, int]:
    """{pid: text or index} -> {pid: index or -1} for the split's pids (others are ignored)."""
    missing = [pid for pid in pids if pid not in raw]
    if missing:
        raise DataError(f"no prediction for {len(missing)} of the {len(pids)} problems "
                        f"(e.g. {', '.join(missing[:5])})")
    out, outside = {}, []
    for pid in pids:
        pred, n = raw[pid], len(problems[pid]["choices"])
        if isinstance(pred, str):
            out[pid] = parse_answer(pred, n)
        elif isinstance(pred, int) and not isinstance(pred, bool):  # true/false are no choice
            out[pid] = pred if 0 <= pred < n else -1
            if not -1 <= pred < n:
                outside.append(f"{pid}: {pred} of {n} choices")
        else:
            raise DataError(f"prediction for {pid} should be generated text or a choice index, got {pred!r}")
    if outside:  # said, or a file indexed from 1 would pass for a model that answers nothing
        warnings.warn(f"{len(outside)} predictions are choice indices out of range, counted unparsed (e.g. "
                      f"{', '.join(outside[:3])}): indices count from 0, and -1 is an unparsed answer", stacklevel=2)
    return out


def score(problems: dict, pids: list[str], preds: dict[str, int]) -> dict:
    """The table as a dict: accuracy (percent, 2 decimals; None for an empty column) and counts."""
    for pid in pids:
        for key in ("subject", "grade", "hint", "image", "answer"):
            if key not in problems[pid]:
                raise DataError(f"problem {pid} has no {key!r}")
    acc, count = {}, {}
    for name, belongs in COLUMNS:
        members = [pid for pid in pids if belongs(problems[pid])]
        right = sum(preds[pid] == problems[pid]["answer"] for pid in members)
        count[name] = len(members)
        acc[name] = round(100 * right / len(members), 2) if members else None
    return {"n": len(pids), "unparsed": sum(preds[pid] == -1 for pid in pids), "acc": acc, "count": count}


def format_table(result: dict, split: str = "") -> str:
    names = [name for name, _ in COLUMNS]
    head = " ".join(f"{n:>6}" for n in names)
    row = " ".join(f"{'-':>6}" if result["acc"][n] is None else f"{result['acc'][n]:6.2f}" for n in names)
    where = f"split {split}: " if split else ""
    return (f"{where}{result['n']} problems, {result['unparsed']} answers unparsed (counted wrong)\n"
            f"{head}\n{row}")


class Evaluation:
    """ScienceQA (or the shapes set) on one split, for evaluate.py: problems.json is read once,
    here, and serves the prompts, the scoring and the picture of the run."""

    def __init__(self, name: str, root: str, split: str, tokenizer, prompt_format: str, use_caption: bool = False,
                 image_mode: str = "lavin", resolution: int = 224):
        from data.batching import TokenizedDataset

        check_format(prompt_format)
        self.name, self.root, self.split, self.prompt_format = name, root, split, prompt_format
        self.problems = open_split(root, split, use_caption)  # {pid: problem}, in the split's order
        self.dataset = TokenizedDataset(samples_of(self.problems, root, split, prompt_format, use_caption), tokenizer,
                                        image_mode=image_mode, resolution=resolution, name=f"{name}/{split}")

    def stop(self, text: str) -> bool:
        """The table reads the first "The answer is X.": once decoded, nothing after it counts."""
        return ANSWER_PATTERN.search(text) is not None

    def score(self, texts: dict) -> tuple[dict, dict]:
        """(the table as a dict, {"preds.json": {pid: choice index or -1}}) from {pid: text}."""
        pids = list(self.problems)
        preds = to_indices(texts, self.problems, pids)
        result = {"dataset": self.name, "split": self.split, "prompt_format": self.prompt_format,
                  **score(self.problems, pids, preds)}
        return result, {"preds.json": preds}

    def table(self, result: dict) -> str:
        return format_table(result, self.split)


def draw_samples(root, split: str, preds: dict, path, n: int = 12, columns: int = 4, cell: int = 160,
                 problems: dict | None = None):
    """A picture of a run (Pillow only): n image problems of the split spread over it, each with
    its question, the model's choice and a mark, green when right and red when wrong. problems:
    the split's {pid: problem} in its order (Evaluation.problems), else read from root. Returns
    the problems drawn (pid, right) in order."""
    from PIL import Image, ImageDraw, ImageFont

    if problems is None:
        release, splits = read_release(root)
        problems = {pid: release[pid] for pid in split_pids(splits, split, root, release)}
    kinds = {}  # image problems by the start of their question, so the picture shows every kind
    for pid in problems:
        if problems[pid]["image"]:
            kinds.setdefault(" ".join(problems[pid]["question"].split()[:2]), []).append(pid)
    queues = list(kinds.values())
    pids = [q[i] for i in range(n) for q in queues if i < len(q)][:n]  # one of each kind in turn
    rows = -(-len(pids) // columns)
    side, text_h = cell - 16, 64
    sheet = Image.new("RGB", (columns * cell, max(rows, 1) * (side + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    try:  # a scalable font where Pillow has FreeType (10.1+), else its bitmap one
        font = ImageFont.load_default(size=12)
    except (TypeError, ImportError):
        font = ImageFont.load_default()
    drawn = []
    for i, pid in enumerate(pids):
        p, guess = problems[pid], preds.get(pid, -1)
        x, y = (i % columns) * cell + 8, (i // columns) * (side + text_h + 8) + 4
        with Image.open(os.path.join(root, "images", split, pid, p["image"])) as im:
            sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        right = guess == p["answer"]
        said = p["choices"][guess] if 0 <= guess < len(p["choices"]) else "(no answer)"
        lines = wrap(p["question"], 24) + [f"model: {said}", "right" if right else f"wrong, it is {p['choices'][p['answer']]}"]
        for k, line in enumerate(lines[-4:]):
            color = (0, 0, 0) if k < len(lines[-4:]) - 2 else (0, 140, 0) if right else (200, 0, 0)
            draw.text((x, y + side + 2 + 15 * k), line, fill=color, font=font)
        drawn.append((pid, right))
    sheet.save(path)
    return drawn


def show_samples(task: Evaluation, split: str, prompt_format: str, out: Path) -> None:
    """A run's samples.png (a dozen test images, the model's answers, from out/preds.json) and the
    next command to try."""
    preds = json.loads((out / "preds.json").read_text())
    drawn = draw_samples(task.root, split, preds, out / "samples.png", problems=task.problems)
    if not drawn:
        return
    pid = drawn[0][0]
    problem = task.problems[pid]
    prompt = build_prompt(problem, prompt_format)[0].replace("\n", "\\n")  # as typed in a shell
    image = Path(task.root) / "images" / split / pid / problem["image"]
    print(f"wrote {out / 'samples.png'} ({sum(r for _, r in drawn)} of {len(drawn)} right). Ask it yourself:\n"
          f'  python sample.py --run {out} --image {image} --prompt "{prompt}"')


def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--data", default=DEFAULT_ROOT, help="ScienceQA release folder (problems.json, pid_splits.json)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--preds", required=True, help="JSON {pid: generated text} or {pid: choice index}")
    ap.add_argument("--out", help="write the table as JSON here, and preds.json next to it")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)

    problems, splits = read_release(args.data)
    pids = split_pids(splits, args.split, args.data, problems)
    raw = load_json(args.preds)
    if isinstance(raw, dict) and isinstance(raw.get("results"), dict):
        raw = raw["results"]  # ScienceQA's own result files wrap the predictions
    if not isinstance(raw, dict):
        raise DataError(f"{args.preds}: expected an object pid -> prediction")
    preds = to_indices(raw, problems, pids)
    result = {"split": args.split, **score(problems, pids, preds)}
    print(format_table(result, args.split))
    if args.out:
        save_json(args.out, result)
        save_json(os.path.join(os.path.dirname(args.out) or ".", "preds.json"), preds, indent=None)
    return result


if __name__ == "__main__":
    from runtime import plain_warnings

    plain_warnings()
    try:
        main()
    except (DataError, FileNotFoundError) as e:  # bad input: the message says it all
        sys.exit(f"error: {e}")
