"""ScienceQA (Lu et al., NeurIPS 2022) read from its official release, and its prompt formats.

LaVIN's main benchmark (paper, section 4, Table 1): fine-tune on `train`, score the 4,241
`test` problems, prompt format QCM-ALE, no captions. The synthetic `shapes` set (data/shapes.py)
uses the same layout and is read by the same code.

    {root}/problems.json    pid -> {question, choices, answer (index), hint, image ("image.png"
                            or null), subject, grade, lecture, solution, split, ...}
    {root}/pid_splits.json  split -> [pid, ...]   (train, val, test, trainval, minival, minitest)
    {root}/captions.json    {"captions": {pid: caption}}   optional, read only with use_caption
    {root}/images/{the problem's split}/{pid}/image.png

    open_split(root, split) ──> {pid: problem}, every problem validated up front
        └─ build_prompt(problem, "QCM-ALE") ──> ("Question: ...\\nResponse:", "The answer is A. BECAUSE: ...")
        └─ load_samples(...) ──> [batching.Sample] for batching.TokenizedDataset

Prompt text follows the reference code (ScienceQA's models/base_prompt.py and LaVIN's
util/base_prompt.py, create_training_example) character for character, quirks included:
  * context = " ".join([hint, caption or ""]).strip(), "N/A" when empty;
  * lecture and solution have "\\n" turned into the two characters backslash-n;
  * prompt = input + "Response:" and target are each `.replace("  ", " ").strip()`: ONE pass,
    so four spaces become two; the target follows "Response:" with no space;
  * output AL gives the *solution* and AE the *lecture*: the reference swaps the letters, and
    we keep its text so that numbers reported under these names stay comparable;
  * a target that ends in "BECAUSE:" (empty lecture and solution) keeps it: LaVIN's clean-up of
    that case assigns to an unused variable, so its model was trained on the dangling word.
The input QCMA ("... Options: ...\\nAnswer: The answer is X.") is MM-CoT's addition.
"""
from __future__ import annotations

import json
import os
import string

from data.batching import Sample

DEFAULT_ROOT = "data/scienceqa"
DEFAULT_FORMAT = "QCM-ALE"
LETTERS = string.ascii_uppercase  # the reference's options list is "ABCDE"; ScienceQA has <= 5 choices

# Q question, C context, M options, L lecture, E explanation (solution), A answer letter
INPUTS = {
    "CQM": "Context: {C}\nQuestion: {Q}\nOptions: {M}\n",
    "QCM": "Question: {Q}\nContext: {C}\nOptions: {M}\n",
    "QCML": "Question: {Q}\nContext: {C}\nOptions: {M}\nBECAUSE: {L}\n",
    "QCME": "Question: {Q}\nContext: {C}\nOptions: {M}\nBECAUSE: {E}\n",
    "QCMLE": "Question: {Q}\nContext: {C}\nOptions: {M}\nBECAUSE: {L} {E}\n",
    "QCLM": "Question: {Q}\nContext: {C}\nBECAUSE: {L}\nOptions: {M}\n",
    "QCEM": "Question: {Q}\nContext: {C}\nBECAUSE: {E}\nOptions: {M}\n",
    "QCLEM": "Question: {Q}\nContext: {C}\nBECAUSE: {L} {E}\nOptions: {M}\n",
    "QCMA": "Question: {Q}\nContext: {C}\nOptions: {M}\nAnswer: The answer is {A}.\n",
}
OUTPUTS = {
    "A": "The answer is {A}.",
    "AL": "The answer is {A}. BECAUSE: {E}",  # sic, as in the reference (see module docstring)
    "AE": "The answer is {A}. BECAUSE: {L}",  # sic
    "ALE": "The answer is {A}. BECAUSE: {L} {E}",
    "AEL": "The answer is {A}. BECAUSE: {E} {L}",
    "LA": "{L} The answer is {A}.",
    "EA": "{E} The answer is {A}.",
    "LEA": "{L} {E} The answer is {A}.",
    "ELA": "{E} {L} The answer is {A}.",
}
PROMPT_FORMATS = tuple(f"{i}-{o}" for i in INPUTS for o in OUTPUTS)


class DataError(ValueError):
    """A data file is readable but its content is wrong; the message names the file and item."""


# ----------------------------------------------------------------------------- prompts

def check_format(prompt_format: str) -> tuple[str, str]:
    inp, _, out = prompt_format.partition("-")
    if inp not in INPUTS or out not in OUTPUTS:
        raise ValueError(f"unknown prompt format {prompt_format!r}: inputs {', '.join(INPUTS)}; "
                         f"outputs {', '.join(OUTPUTS)} (e.g. {DEFAULT_FORMAT})")
    return inp, out


def context_text(problem: dict, use_caption: bool) -> str:
    caption = problem.get("caption", "") if use_caption else ""
    return " ".join([problem["hint"], caption]).strip() or "N/A"


def choices_text(problem: dict) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))


def escape_newlines(text: str) -> str:
    return text.replace("\n", "\\n")  # one line per field, as the reference writes it


def build_prompt(problem: dict, prompt_format: str = DEFAULT_FORMAT, use_caption: bool = False) -> tuple[str, str]:
    """(prompt, target) for one problem; the model reads prompt and learns/generates target.

    With use_caption the problem needs a "caption" key (open_split adds it from captions.json).
    """
    inp, out = check_format(prompt_format)
    fields = {"Q": problem["question"], "C": context_text(problem, use_caption),
              "M": choices_text(problem), "L": escape_newlines(problem["lecture"]),
              "E": escape_newlines(problem["solution"]), "A": LETTERS[problem["answer"]]}
    prompt = (INPUTS[inp].format(**fields) + "Response:").replace("  ", " ").strip()
    target = OUTPUTS[out].format(**fields).replace("  ", " ").strip()
    return prompt, target


# ----------------------------------------------------------------------------- release files

def save_json(path: str, obj, indent: int | None = 2) -> None:
    """json.dump into path, its folder made first (the scoring commands' --out)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def load_json(path: str):
    """json.load with errors that name the file (and the position, when it is malformed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'} "
                                f"(expected {path})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} "
                        f"(char {e.pos}): {e.msg}") from e


def read_release(root: str = DEFAULT_ROOT) -> tuple[dict, dict]:
    """problems.json and pid_splits.json, checked for shape only."""
    problems = load_json(os.path.join(root, "problems.json"))
    splits = load_json(os.path.join(root, "pid_splits.json"))
    if not isinstance(problems, dict):
        raise DataError(f"{os.path.join(root, 'problems.json')}: expected an object pid -> problem")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"{os.path.join(root, 'pid_splits.json')}: expected an object split -> [pid, ...]")
    return problems, splits


def split_pids(splits: dict, split: str, root: str, problems: dict) -> list[str]:
    if split not in splits:
        raise DataError(f"split {split!r} is not in {os.path.join(root, 'pid_splits.json')}; "
                        f"available: {', '.join(sorted(splits))}")
    pids = [str(p) for p in splits[split]]
    for pid in pids:
        if pid not in problems:
            raise DataError(f"pid {pid} is listed in split {split!r} of pid_splits.json but absent "
                            f"from {os.path.join(root, 'problems.json')}")
    return pids


def image_path(root: str, pid: str, problem: dict, split: str) -> str | None:
    """images/{split}/{pid}/image.png; the problem's own split wins, so trainval/minival work."""
    if not problem.get("image"):
        return None
    return os.path.join(root, "images", problem.get("split") or split, pid, problem["image"])


FIELD_TYPES = {"question": str, "choices": list, "answer": int, "hint": str, "lecture": str, "solution": str}


def check_problem(pid: str, p: dict, where: str) -> None:
    """Raise DataError naming the pid if a field the prompt needs is missing or wrong."""
    if not isinstance(p, dict):
        raise DataError(f"{where}: problem {pid} is not an object")
    for key, typ in FIELD_TYPES.items():
        if key not in p:
            raise DataError(f"{where}: problem {pid} has no {key!r}")
        if not isinstance(p[key], typ) or isinstance(p[key], bool):
            raise DataError(f"{where}: problem {pid}: {key!r} should be {typ.__name__}, got {p[key]!r}")
    if not p["choices"] or len(p["choices"]) > len(LETTERS) or not all(isinstance(c, str) for c in p["choices"]):
        raise DataError(f"{where}: problem {pid}: choices must be 1..26 strings, got {p['choices']!r}")
    if not 0 <= p["answer"] < len(p["choices"]):
        raise DataError(f"{where}: problem {pid}: answer index {p['answer']} is outside its "
                        f"{len(p['choices'])} choices")
    if p.get("image") is not None and not isinstance(p["image"], str):
        raise DataError(f"{where}: problem {pid}: 'image' should be a file name or null, got {p['image']!r}")


def open_split(root: str = DEFAULT_ROOT, split: str = "train", use_caption: bool = False,
               check_images: bool = True) -> dict[str, dict]:
    """{pid: problem} for one split, in the split's order, everything validated now.

    Each problem is a copy with "caption" added (from captions.json with use_caption, else "").
    """
    problems, splits = read_release(root)
    pids = split_pids(splits, split, root, problems)
    captions = {}
    if use_caption:
        path = os.path.join(root, "captions.json")
        captions = load_json(path)
        if not isinstance(captions, dict) or not isinstance(captions.get("captions"), dict):
            raise DataError(f"{path}: expected {{\"captions\": {{pid: caption}}}}")
        captions = captions["captions"]
    where = os.path.join(root, "problems.json")
    out = {}
    for pid in pids:
        check_problem(pid, problems[pid], where)
        path = image_path(root, pid, problems[pid], split)
        if check_images and path is not None and not os.path.isfile(path):
            raise DataError(f"problem {pid} has an image but {path} does not exist")
        out[pid] = {**problems[pid], "caption": captions.get(pid) or ""}  # reference: "" if absent
    return out


def load_samples(root: str = DEFAULT_ROOT, split: str = "train", prompt_format: str = DEFAULT_FORMAT,
                 use_caption: bool = False, check_images: bool = True) -> list[Sample]:
    """One Sample per problem of the split: (prompt, target) and the image path or None."""
    check_format(prompt_format)  # fail on a typo before reading anything
    return samples_of(open_split(root, split, use_caption, check_images), root, split, prompt_format, use_caption)


def samples_of(problems: dict, root: str, split: str, prompt_format: str, use_caption: bool = False) -> list[Sample]:
    """One Sample per problem of open_split's {pid: problem}: (prompt, target), image path or None."""
    return [Sample(pid, (build_prompt(p, prompt_format, use_caption),), image_path(root, pid, p, split))
            for pid, p in problems.items()]
