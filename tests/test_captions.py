"""data/captions.py: caption metrics against values worked out by hand (the arithmetic is in the
comments), the command line, and the COCO evaluation task. L below is log(2): the idf of an n-gram in
one of two images."""
import json
import math

import pytest

import data
from data import captions, coco
from data.captions import bleu, cider_d, tokenize
from data.scienceqa import DataError
from data.shapes import BACKBONES
from model import Tokenizer
from tests.helpers import write_karpathy


def toks(*sentences):
    return [s.split() for s in sentences]


@pytest.mark.parametrize("text,tokens", [
    ("A man's dog, running.", ["a", "man", "'s", "dog", "running"]),
    ("Don't stop!", ["do", "n't", "stop"]),
    ("A black-and-white photo of 3.5 cats", ["a", "black-and-white", "photo", "of", "3.5", "cats"]),
    ('A (red) ball... "big"; ok?', ["a", "red", "ball", "big", "ok"]),
    ("1,000 birds at o'clock, can't fly", ["1,000", "birds", "at", "o'clock", "ca", "n't", "fly"])])
def test_tokenize_as_ptb_leaves_captions(text, tokens):
    assert tokenize(text) == tokens


def test_bleu_by_hand():
    # a perfect match: every precision 1 (up to the toolkit's 1e-15 / 1e-9 smoothing), no penalty
    assert bleu(toks("a red circle on the left"), [toks("a red circle on the left")]) == pytest.approx([1] * 4, abs=1e-8)
    # brevity: 2 words against 6; p1 = 2/2, p2 = 1/1, no trigram: (1e-15 / 1e-9); BP = exp(1 - 6/2)
    bp = math.exp(-2)
    assert bleu(toks("the cat"), [toks("the cat sat on the mat")]) == pytest.approx(
        [bp, bp, (1e-6) ** (1 / 3) * bp, (1e-6 * 1e-6) ** (1 / 4) * bp], rel=1e-6)
    # clipping: "the" counted at most once, as often as the reference holds it: p1 = 1/4
    assert bleu(toks("the the the the"), [toks("the cat")])[0] == pytest.approx(0.25)
    # the closest reference length, a tie going to the shorter: 4 words, references of 3 and 5 -> r = 3, no BP
    # (r = 5 would give exp(1 - 5/4))
    assert bleu(toks("a b c d"), [toks("a b c", "a b c d e")])[0] == pytest.approx(1.0)
    # corpus level: (2 + 1) matches of (2 + 4) words = 0.5, not the mean of 1 and 0.25
    assert bleu(toks("a b", "c d e f"), [toks("a b"), toks("c x y z")])[0] == pytest.approx(0.5)


def test_bleu_clips_each_ngram_at_its_largest_count_in_one_reference():
    # "a a a b" against "a b" and "a x": "a" occurs once in each reference, so it is clipped at 1
    # (not at 2, their sum); "b" at 1: 2 of 4 unigrams; lengths 4 against 2: no brevity penalty
    assert bleu(toks("a a a b"), [toks("a b", "a x")], n=1)[0] == pytest.approx(0.5, abs=1e-9)


def test_bleu_closest_reference_length_ties_go_to_the_shorter_in_any_order():
    # 3 words against references of 2 and 4 words: both 1 away, the shorter (2) is taken, so no
    # brevity penalty (the longer would give exp(1 - 4/3)); the candidate's 3 unigrams are all right
    for refs in (["a b", "a b c d"], ["a b c d", "a b"]):
        assert bleu(toks("a b c"), [toks(*refs)], n=1)[0] == pytest.approx(1.0, abs=1e-9)


def test_cider_d_document_frequency_by_hand():
    # "a" is in both images' references: idf log 2 - log 2 = 0, it weighs nothing.
    # image 1, a perfect match: cosine 1 for n = 1, 2, 3, no 4-gram: 10 * 3/4 = 7.5
    # image 2, "a blue star" vs "a blue square": n=1 blue . blue / (L sqrt2 . L sqrt2) = 1/2,
    #   n=2 "a blue": 1/2, n=3 and 4: 0 -> 10 * 1/4 = 2.5 (with "a" weighted, n=1 would be 2/3)
    mean, each = cider_d(toks("a red circle", "a blue star"), [toks("a red circle"), toks("a blue square")])
    assert each == pytest.approx([7.5, 2.5]) and mean == pytest.approx(5.0)
    # the score is a mean over references, not a sum
    assert cider_d(toks("a red circle", "a blue star"), [toks("a red circle", "a red circle"),
                                                         toks("a blue square")])[1][0] == pytest.approx(7.5)


def test_cider_d_clipping_and_length_penalty_by_hand():
    # "red red red circle" vs "red circle" (idf L for every n-gram): n=1 weights (3L, L) vs (L, L):
    #   clipped dot min(3L, L) L + L L = 2 L^2, over L sqrt10 . L sqrt2 -> 1/sqrt5 (unclipped: 2/sqrt5);
    #   n=2 ("red red" 2L, "red circle" L) vs ("red circle" L): L^2 / (L sqrt5 . L) = 1/sqrt5; n=3, 4: 0.
    #   Lengths (bigrams) 3 and 1: the penalty exp(-2^2 / (2 . 6^2)). 10 * exp(-1/18) * (2/sqrt5) / 4
    # "blue square" vs itself: 10 * (1 + 1) / 4 = 5
    first = 10 * math.exp(-4 / 72) * (2 / math.sqrt(5)) / 4
    mean, each = cider_d(toks("red red red circle", "blue square"), [toks("red circle"), toks("blue square")])
    assert each == pytest.approx([first, 5.0]) and mean == pytest.approx((first + 5.0) / 2)


def test_score_and_command_line(tmp_path):
    root = write_karpathy(tmp_path / "coco")
    preds = {"1": "A red circle.", "2": "A blue star!"}
    result = captions.score(preds, coco.references_of(coco.read_karpathy(str(root)), "test"))
    assert result["CIDEr"] == pytest.approx(500.0) and result["images"] == 2  # x100: 5.0 above
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    out = tmp_path / "r" / "results.json"
    got = captions.main(["--data", str(root), "--preds", str(tmp_path / "preds.json"), "--out", str(out)])
    assert json.loads(out.read_text()) == got == result
    assert set(got) >= {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}
    with pytest.raises(DataError, match="no caption for 1 of the 2 images"):
        captions.score({"1": "x"}, coco.references_of(coco.read_karpathy(str(root)), "test"))


def test_captions_of_unknown_images_and_empty_ones_are_named(tmp_path, capsys):
    root = write_karpathy(tmp_path / "coco")
    preds = {"1": "A red circle.", "2": " ?! ", "77": "a cat", "78": "a dog"}
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    got = captions.main(["--data", str(root), "--preds", str(tmp_path / "preds.json")])
    out = capsys.readouterr()
    assert out.err.splitlines() == ["warning: 2 caption(s) for images not in split test, left out: cocoid 77, 78",
                                    "warning: 1 empty caption(s), scored as they are: cocoid 2"]
    assert "2 images, one caption each (1 empty)" in out.out and got["empty"] == 1 and got["images"] == 2
    assert got == captions.score({"1": "A red circle.", "2": ""}, coco.references_of(coco.read_karpathy(str(root)), "test"))


def test_coco_evaluation_task(tmp_path):
    root = write_karpathy(tmp_path / "coco")
    task = data.evaluation("coco", str(root), "test", Tokenizer(BACKBONES / "tokenizer.model"), resolution=16)
    assert [s.pid for s in task.dataset.samples] == ["1", "2"] and task.stop("A red circle.\n")
    result, files = task.score({"1": "A red circle.\nMore", "2": "A blue square."})
    assert files["preds.json"] == {"1": "A red circle.", "2": "A blue square."}
    assert result["BLEU-1"] == pytest.approx(100.0) and result["dataset"] == "coco"
