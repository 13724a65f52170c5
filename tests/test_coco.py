"""data/coco.py: the Karpathy split's reader and its bad inputs."""
import json

import pytest

from data import coco
from data.scienceqa import DataError
from tests.helpers import write_karpathy


def test_karpathy_reader(tmp_path):
    root = write_karpathy(tmp_path / "coco")
    samples = coco.load_samples(str(root), "train")  # train + restval, one sample per reference
    assert [s.pid for s in samples] == ["3_0", "3_1", "4_0"]
    assert samples[0].turns == ((coco.CAPTION_PROMPT, "A green star."),)
    assert samples[0].image == str(root / "train2014" / "COCO_train2014_000000000003.jpg")
    assert coco.CAPTION_PROMPT == "Instruction: Describe the image in one sentence.\nResponse:"
    assert coco.references_of(coco.read_karpathy(str(root)), "test") == {"1": ["A red circle.", "a  red circle"],
                                                                       "2": ["A blue square."]}


def test_karpathy_bad_input_names_the_entry(tmp_path):
    root = write_karpathy(tmp_path / "coco")
    (root / "val2014" / "COCO_val2014_000000000004.jpg").unlink()
    with pytest.raises(DataError, match="image 4: .*COCO_val2014_000000000004.jpg does not exist"):
        coco.load_samples(str(root), "train")
    release = json.loads((root / "dataset_coco.json").read_text())
    release["images"][1]["sentences"] = []
    (root / "dataset_coco.json").write_text(json.dumps(release))
    with pytest.raises(DataError, match="dataset_coco.json: image 2: needs a non-empty list of sentences"):
        coco.read_karpathy(str(root))
    release["images"][1]["sentences"], release["images"][0]["split"] = [{"raw": "x"}], "testing"
    (root / "dataset_coco.json").write_text(json.dumps(release))
    with pytest.raises(DataError, match="image 1: unknown split 'testing'"):
        coco.read_karpathy(str(root))
    with pytest.raises(DataError, match="unknown split 'restval': use train"):
        coco.images_of([], "restval")
