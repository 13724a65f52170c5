"""Instruction data for the LaVIN chatbot: LLaVA-Instruct-150K (COCO images) + Alpaca-52k (text).

The paper's multimodal chatbot (section 4) is trained on both at once: the modality token
tells the routers which samples have an image. Files:

    {root}/alpaca_data.json              [{instruction, input, output}]                text only
    {root}/complex_reasoning_77k.json    [{id, image, conversations: [{from: human|gpt, value}]}]
    {root}/detail_23k.json               same
    {root}/conversation_58k.json         same, several turns per conversation
    {coco_root}/COCO_train2014_{image}   image is e.g. "000000123456.jpg"; coco_root: COCO's train2014/

    mode="recipe" (default, LaVIN's tools/data_processing.py):
        Alpaca -> ("Instruction: {instruction} {input}\\nResponse:", output)
        each human/gpt pair -> ("Instruction: {human without <image>}\\nResponse:", gpt), + image
    mode="multiturn" (ours): one sample per conversation, its turns in order, the prompts
        masked and every gpt answer carrying loss; tokens BOS turn1 EOS turn2 EOS ... (each turn
        text exactly as in the recipe, see batching.encode_turns)
    all samples concatenated (Alpaca, then the LLaVA files in the order above); the sampler shuffles.

Text details kept from the reference: the prompt is built as "Instruction: " + text + "\\n" +
"Response: " and then `.replace("  ", " ").strip()`, so the strip removes the trailing space
after "Response:" and the answer follows with no space; an empty Alpaca input leaves
"{instruction} \\nResponse:" (the single space before the newline is not doubled, so it stays).
The marker is removed as the reference does, "<image>\\n" and "\\n<image>" only. Answers are used
as they are (no collapsing, no strip).
"""
from __future__ import annotations

import os

from data.batching import Sample, TokenizedDataset
from data.scienceqa import DataError, load_json

DEFAULT_ROOT = "data/instruct"
ALPACA = "alpaca_data.json"
LLAVA = ("complex_reasoning_77k.json", "detail_23k.json", "conversation_58k.json")
MODES = ("recipe", "multiturn")


def instruction_prompt(text: str) -> str:
    return ("Instruction: " + text + "\n" + "Response: ").replace("  ", " ").strip()


def strip_image_marker(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "")


def alpaca_turn(entry: dict) -> tuple[str, str]:
    return instruction_prompt(entry["instruction"] + " " + entry["input"]), entry["output"]


def llava_turns(entry: dict) -> list[tuple[str, str]]:
    """(prompt, answer) for each human/gpt pair of a conversation, in order."""
    conv = entry["conversations"]
    return [(instruction_prompt(strip_image_marker(conv[j]["value"])), conv[j + 1]["value"])
            for j in range(0, len(conv), 2)]


# ----------------------------------------------------------------------------- validation

def check_alpaca(data, path: str) -> None:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{instruction, input, output}}")
    for i, e in enumerate(data):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("instruction", "input", "output")):
            raise DataError(f"{path}: entry #{i} needs string fields instruction, input, output; got {e!r:.200}")


def check_llava(data, path: str, coco_root: str, check_images: bool) -> None:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{id, image, conversations}}")
    for i, e in enumerate(data):
        name = f"{path}: entry {e['id'] if isinstance(e, dict) and 'id' in e else '#' + str(i)}"
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "id" not in e:
            raise DataError(f"{name}: needs 'id' and an 'image' file name")
        conv = e.get("conversations")
        if not isinstance(conv, list) or not conv or len(conv) % 2:
            raise DataError(f"{name}: 'conversations' must be a non-empty list of human/gpt pairs")
        for j, turn in enumerate(conv):
            expected = "human" if j % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
                raise DataError(f"{name}: turn {j} should be {{from: {expected}, value: str}}, got {turn!r:.200}")
        image = coco_image(coco_root, e["image"])
        if check_images and not os.path.isfile(image):
            raise DataError(f"{name}: image {image} does not exist")


def coco_image(coco_root: str, image: str) -> str:
    return os.path.join(coco_root, "COCO_train2014_" + image)  # LLaVA names drop COCO's prefix


# ----------------------------------------------------------------------------- samples

def load_samples(root: str = DEFAULT_ROOT, coco_root: str = "data/instruct/train2014", mode: str = "recipe",
                 check_images: bool = True) -> list[Sample]:
    """All chatbot samples, validated up front (missing files, malformed entries, images)."""
    if mode not in MODES:
        raise ValueError(f"unknown instruction mode {mode!r}: use one of {', '.join(MODES)}")
    paths = [os.path.join(root, f) for f in (ALPACA, *LLAVA)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"instruction data incomplete in {root}: missing "
                                f"{', '.join(os.path.basename(p) for p in missing)}")
    alpaca = load_json(paths[0])
    check_alpaca(alpaca, paths[0])
    samples = [Sample(f"alpaca_{i}", (alpaca_turn(e),)) for i, e in enumerate(alpaca)]
    for path in paths[1:]:
        data = load_json(path)
        check_llava(data, path, coco_root, check_images)
        stem = os.path.basename(path).split(".")[0]
        for e in data:
            image, turns = coco_image(coco_root, e["image"]), llava_turns(e)
            if mode == "multiturn":
                samples.append(Sample(f"{stem}_{e['id']}", tuple(turns), image))
            else:  # the recipe keeps each pair on its own (complex/detail have one pair each)
                samples += [Sample(f"{stem}_{e['id']}_{j}", (t,), image) for j, t in enumerate(turns)]
    return samples


# ----------------------------------------------------------------------------- text-only evaluation

def normalise(text: str) -> str:
    """What exact match compares: lower case, single spaces, no final period."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


class TextEvaluation:
    """Held-out text-only instructions, {root}/alpaca_{split}.json in Alpaca's format, for
    evaluate.py: each prompt as in training (no image: the router's text path), the answer read to
    EOS and scored by exact match with the output (after `normalise`). Our score, not the paper's:
    it asks whether the chatbot still answers what its LLaMA answered before it learnt to see."""

    name = "alpaca"

    def __init__(self, root: str, split: str, tokenizer):
        path = os.path.join(root, f"alpaca_{split}.json")
        entries = load_json(path)
        check_alpaca(entries, path)
        self.split, self.path = split, path
        self.references = {f"alpaca_{split}_{i}": e["output"] for i, e in enumerate(entries)}
        samples = [Sample(pid, (alpaca_turn(e),)) for pid, e in zip(self.references, entries)]
        self.dataset = TokenizedDataset(samples, tokenizer, name=f"alpaca/{split}")

    def stop(self, text: str) -> bool:
        return False  # an answer ends at EOS

    def score(self, texts: dict) -> tuple[dict, dict]:
        missing = [pid for pid in self.references if pid not in texts]
        if missing:
            raise DataError(f"no response for {len(missing)} of the {len(self.references)} instructions of "
                            f"{self.path} (e.g. {missing[0]})")
        right = {pid: normalise(texts[pid]) == normalise(ref) for pid, ref in self.references.items()}
        result = {"dataset": "alpaca", "split": self.split, "n": len(right),
                  "exact": round(100 * sum(right.values()) / max(1, len(right)), 2)}
        preds = {pid: {"response": texts[pid], "reference": self.references[pid], "right": ok}
                 for pid, ok in right.items()}
        return result, {"preds.json": preds}

    def table(self, result: dict) -> str:
        return (f"alpaca/{result['split']}: {result['n']} text-only instructions, exact match "
                f"{result['exact']:.2f}%")
