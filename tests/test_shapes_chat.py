"""data/shapes_chat.py: the synthetic chatbot set, in LLaVA-Instruct's, COCO's, MME's and Alpaca's
formats, read multi-turn with loss on every answer."""
import json

from PIL import Image

import data
from data import mme, shapes_chat
from data.batching import IGNORE_INDEX


def test_shapes_chat_files_are_in_the_real_formats(chat_set):
    llava = json.loads((chat_set / "conversation_58k.json").read_text())
    e = llava[0]
    assert set(e) == {"id", "image", "conversations"} and e["image"] == "000000000001.jpg"
    assert [t["from"] for t in e["conversations"]] == ["human", "gpt"] * 3
    assert "<image>" in e["conversations"][0]["value"]
    with Image.open(chat_set / "train2014" / "COCO_train2014_000000000001.jpg") as im:
        assert im.format == "JPEG"
    release = mme.read_release(chat_set / "mme")
    assert sorted(release) == ["color", "count", "existence", "position"]
    for images in release.values():  # a yes and a no question per picture
        assert all(sorted(a for _, a in e["questions"]) == ["no", "yes"] for e in images.values())
    alpaca = json.loads((chat_set / "alpaca_test.json").read_text())
    assert all(set(a) == {"instruction", "input", "output"} for a in alpaca)


def test_multiturn_loss_on_every_answer_and_only_there(chat_set, shapes_tok):
    ds = data.build_dataset("shapes-chat", str(chat_set), "train", shapes_tok, instruct_mode="multiturn", resolution=16)
    i = next(i for i, s in enumerate(ds.samples) if s.pid.startswith("conversation_58k"))
    sample, labels = ds.samples[i], ds.labels[i].tolist()
    assert len(sample.turns) == 3 and sample.image.endswith("COCO_train2014_000000000001.jpg")
    spans, current = [], []
    for x in labels + [IGNORE_INDEX]:  # the runs of loss-carrying labels
        if x == IGNORE_INDEX and current:
            spans.append(current)
            current = []
        elif x != IGNORE_INDEX:
            current.append(x)
    assert len(spans) == 3
    for span, (_, answer) in zip(spans, sample.turns):
        assert span[-1] == shapes_tok.eos_id and shapes_tok.decode(span[:-1]).strip() == answer.strip()
    recipe = data.build_dataset("shapes-chat", str(chat_set), "train", shapes_tok, resolution=16)
    assert len(recipe) == 24 * 5 + shapes_chat.ALPACA  # detail 1 + complex 1 + conversation 3 pairs
