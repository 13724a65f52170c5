"""End to end across the files: the synthetic set's files in the official formats -> loaders -> data ->
LaVIN -> loss; whole runs of train.py then sample.py (ScienceQA-style, the chatbot, captions, LaVIN-lite)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import data
import quant
import sample
import train
from clip import load_clip
from data import captions, coco, shapes, shapes_chat
from lavin import LaVIN, LaVINArgs
from model import load_llama
from tests.helpers import config


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "shapes"
    return shapes.ensure(root, n_problems=60, seed=0, quiet=True)


def test_a_shapes_batch_trains_a_tiny_lavin(shapes_root):
    llama, tok = load_llama(shapes_root / "llama")
    visual = load_clip(shapes_root / "clip" / "ViT-tiny.pt")
    model = LaVIN(LaVINArgs(), llama, visual,
                  tok.encode("Image: ", bos=False, eos=False), tok.encode("Image: N/A", bos=False, eos=False))
    ds = data.build_dataset("shapes", str(shapes_root), "train", tok, max_seq_len=llama.args.max_seq_len,
                            reserve=model.n_inserted, resolution=visual.resolution)
    sampler = data.LengthGroupedBatchSampler(ds.lengths, 8, seed=0)
    batch = next(iter(DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)))
    assert 0 < batch["img_indicator"].sum() < 8  # image and text-only samples in one batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "adapter" not in k}
    model.train()
    losses = []
    for _ in range(3):
        loss = model(batch["tokens"], batch["images"], batch["img_indicator"], batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.slow
def test_shortened_demo_learns_to_see(tmp_path):
    """The README's first command, shortened to 3 epochs (a minute): the image questions end well
    above chance (a third; 65% measured, 93% after the full 10 epochs), and the run leaves its
    table and its picture."""
    import train

    root = shapes.ensure(tmp_path / "shapes", quiet=True)
    cfg, _ = train.make_config(["--dataset", "shapes", "--data_path", str(root), "--epochs", "3",
                                "--output_dir", str(tmp_path / "out")])
    result = train.main(cfg, [])
    assert result["eval"]["acc"]["IMG"] >= 55 and result["eval"]["acc"]["TXT"] >= 95
    assert (tmp_path / "out" / "samples.png").is_file() and (tmp_path / "out" / "results.json").is_file()


def test_chatbot_run_end_to_end(chat_set, tmp_path):
    out = tmp_path / "run"
    cfg, _ = train.make_config(["--dataset", "shapes-chat", "--data_path", str(chat_set), "--instruct_mode",
                                "multiturn", "--max_steps", "2", "--output_dir", str(out)])
    result = train.main(cfg)
    assert result["steps"] == 2 and set(result["eval"]) == {"mme", "alpaca"}
    mme_result = json.loads((out / "eval-mme" / "results.json").read_text())
    assert set(mme_result) >= {"subtasks", "perception", "cognition", "total", "unparsed"}
    assert sorted(mme_result["subtasks"]) == ["color", "count", "existence", "position"]
    preds = json.loads((out / "eval-mme" / "preds.json").read_text())
    assert len(preds) == 4 * shapes_chat.TEST_PICTURES and all(len(v) == 2 for v in preds.values())
    assert json.loads((out / "eval-alpaca" / "results.json").read_text())["n"] == shapes_chat.ALPACA_TEST
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["dataset"] for r in logged if "eval" in r] == ["mme", "alpaca"]
    # sample.py on the run: MME from the run's own set by default, the text score on request
    cfg, mode = sample.resolve(sample.SampleConfig(run=str(out)))
    assert (mode, cfg.dataset, cfg.data_path, cfg.output_dir, cfg.template) == \
        ("eval", "mme", f"{chat_set}/mme", f"{out}/eval-mme", "instruction")
    cfg, _ = sample.resolve(sample.SampleConfig(run=str(out), dataset="alpaca"))
    assert (cfg.data_path, cfg.output_dir) == (str(chat_set), f"{out}/eval-alpaca")


def test_caption_run_end_to_end(tmp_path):
    import sample
    import train
    from data import shapes_coco

    root = shapes_coco.generate(tmp_path / "shapes-coco", quiet=True)
    images = coco.read_karpathy(str(root))  # the reader's own checks pass on the written file
    assert {e["split"] for e in images} == {"train", "restval", "val", "test"}
    assert all(len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5 for e in images)
    out = tmp_path / "run"
    # the command: the real format's reader and preset, the set's own tiny backbones
    cfg, _ = train.make_config(["--dataset", "coco", "--data_path", str(root), "--max_steps", "2",
                                "--eval_split", "val", "--output_dir", str(out)])
    assert train.resolve(cfg).llama_path == f"{root}/vicuna" and cfg.preset == "caption"
    result = train.main(cfg)
    assert result["steps"] == 2 and result["eval"]["images"] == shapes_coco.SPLIT_SIZES["val"]
    written = json.loads((out / "results.json").read_text())
    assert written == result["eval"] and set(written) >= {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}
    preds = json.loads((out / "preds.json").read_text())
    assert len(preds) == 100 and all(isinstance(v, str) for v in preds.values())
    # the scores of the file sample.py wrote, read back by the command line, are the run's
    assert captions.main(["--data", str(root), "--split", "val", "--preds", str(out / "preds.json")]) == \
        {k: v for k, v in written.items() if k not in ("dataset", "split", "decode_steps_per_problem",
                                                        "reference_steps_per_problem", "early_stop")}
    cfg, mode = sample.resolve(sample.SampleConfig(run=str(out), split="val"))
    assert (mode, cfg.dataset, cfg.data_path, cfg.output_dir) == ("eval", "coco", str(root), f"{out}/eval-val")


def test_train_at_4_bits_then_sample_the_run(tiny_set, tmp_path, capsys):
    """A lite run end to end: its adapters say 4 bits, sample.py --run loads the LLaMA at 4 bits by
    itself, keeps the adapters unfolded (said once) and answers; at --bits 16 it warns."""
    import sample
    import train

    result = train.main(config(tiny_set, tmp_path / "run", bits=4, max_steps=2))
    assert quant.bits_of(result["model"].llama) == 4 and result["steps"] == 2 and math.isfinite(result["loss"])
    assert torch.load(tmp_path / "run" / "adapters.pth", weights_only=True)["bits"] == 4
    capsys.readouterr()
    prompt = "Question: Which shape is it?\\nOptions: (A) circle (B) square\\nResponse:"
    answer = sample.main(sample.make_config(["--run", str(tmp_path / "run"), "--prompt", prompt,
                                             "--max_new_tokens", "4"]))
    err = capsys.readouterr().err
    assert isinstance(answer, str) and err.count("the adapters stay unfolded") == 1 and "4-bit weights" in err
    with pytest.warns(UserWarning, match="trained against a 4-bit"):
        sample.main(sample.make_config(["--run", str(tmp_path / "run"), "--prompt", prompt, "--bits", "16",
                                        "--max_new_tokens", "2"]))
    with pytest.raises(train.UsageError, match="comes from a run with bits=4, this run has bits=16"):
        train.main(config(tiny_set, tmp_path / "other", resume=str(tmp_path / "run" / "checkpoint.pth"), max_steps=3))
    # From the command line: the warning is one plain line, and the table at 16 bits is not the run's own
    r = subprocess.run([sys.executable, "sample.py", "--run", str(tmp_path / "run"), "--bits", "16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if "trained against" in x]
    assert warned == [f"warning: {tmp_path / 'run' / 'adapters.pth'} was trained against a 4-bit (NF4) LLaMA "
                      f"(LaVIN-lite); this model's LLaMA is 16-bit, so its answers may differ: load it with bits=4 "
                      f"(--bits 4)"] and "UserWarning" not in r.stderr
    assert (tmp_path / "run" / "eval-test-16bit" / "results.json").is_file()
    assert not (tmp_path / "run" / "eval-test").exists()
