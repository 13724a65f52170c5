"""Bad inputs end in one line that says what to fix, before any compute (issue 34's table, row by
row). Each test names the bug it was checked against: planted once, the test failed."""
import json

import pytest
import torch

import data
from config import make_config, resolve
from model import Tokenizer
from runtime import UsageError
from tests.helpers import edit_json, run_cli


@pytest.mark.parametrize("flag,value,said", [
    ("blr", "nan", "--blr must be a finite number above 0, got nan"),
    ("blr", "inf", "--blr must be a finite number above 0, got inf"),
    ("blr", "-1", "--blr must be a finite number above 0, got -1.0"),
    ("temperature", "nan", "--temperature must be a finite number above 0, got nan"),
    ("dist_timeout", "0", "--dist_timeout must be a finite number above 0, got 0.0"),
    ("save_interval", "-5", "--save_interval must be at least 0, got -5"),
    ("max_steps", "-1", "--max_steps must be at least 0, got -1"),
])
def test_settings_that_cannot_train_are_refused(flag, value, said):
    """Planted: the plain `cfg.blr <= 0` of before (nan and inf pass it); save_interval unchecked."""
    cfg, _ = make_config(["--dataset", "shapes", f"--{flag}", value])
    with pytest.raises(UsageError) as e:
        resolve(cfg)
    assert str(e.value) == said


def test_a_nan_learning_rate_is_one_line_on_the_command_line(tmp_path):
    """Planted: the same; torch's optimizer then raised `Invalid learning rate: nan` in a traceback."""
    r = run_cli("--dataset", "shapes", "--blr", "nan", "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.strip() == "error: --blr must be a finite number above 0, got nan"
    assert not (tmp_path / "out").exists()


def test_params_json_that_does_not_match_its_weights_is_one_line(tmp_path, tiny_set):
    """params.json says dim 128 over weights 96 wide: one line naming the folder, params.json, the
    key and both shapes, from train.py as from sample.py. Planted: train.build_model without its
    try (the 22-line traceback of before); check_state's source left as "checkpoint"."""
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(tiny_set / "llama", llama)
    shutil.copy(tiny_set / "tokenizer.model", llama / "tokenizer.model")
    edit_json(llama / "params.json", lambda p: p.update(dim=128))
    r = run_cli("--dataset", "shapes", "--data_path", str(tiny_set), "--llama_path", str(llama),
                "--output_dir", str(tmp_path / "out"))
    want = (f"error: {llama}'s weights against its params.json: tok_embeddings.weight has shape (")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(want) and "96), the model's is (" in r.stderr and "128)" in r.stderr


def test_no_room_for_any_answer_is_refused_before_training(tmp_path, tiny_set):
    """--max_seq_len 8: every sample loses its whole target. Planted: the check in train.setup
    removed (the run trained NaN steps, wrote adapters.pth, then died in the evaluation)."""
    out = tmp_path / "out"
    r = run_cli("--dataset", "shapes", "--data_path", str(tiny_set), "--max_seq_len", "8", "--output_dir", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --max_seq_len 8 leaves no room for any answer: every one of the 24 samples of shapes/train lost its whole "
        "target to the cut (the image's 6 inserted positions count too): raise it")
    assert not (out / "checkpoint.pth").exists() and not (out / "adapters.pth").exists()


def test_a_run_whose_loss_stays_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_set):
    """--blr 1e30 (finite): the adapters blow up in two steps, then every loss is NaN and skipped,
    which changes nothing: the second epoch's checkpoint is refused with an error and exit 1, no
    evaluation runs, the first epoch's checkpoint stays whole. Planted: checkpoint.unusable
    returning "" (the run finished, exit 0, with useless adapters and one warning)."""
    out = tmp_path / "out"
    r = run_cli("--dataset", "shapes", "--data_path", str(tiny_set), "--output_dir", str(out), "--blr", "1e30",
                "--epochs", "4", "--batch_size", "4", "--effective_batch", "8")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: the loss was NaN or inf at every step since step 2 (4 steps), and a skipped step changes nothing: "
        f"the run would not recover ({out / 'checkpoint.pth'} is the last good checkpoint); lower --blr (it is "
        f"1e+30), check --precision and that the answers fit --max_seq_len")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (out / "results.json").exists()


def test_adapters_that_are_not_finite_are_never_saved(tmp_path, tiny_set):
    """A run's adapters holding a NaN (fp16 overflow, say) at a checkpoint: an error naming the
    tensor, the checkpoint before it left as it was. Planted: the isfinite check removed."""
    import train
    from checkpoint import save_checkpoint
    from tests.helpers import config

    out = tmp_path / "out"
    cfg = resolve(config(tiny_set, out))
    run = train.setup(cfg, 0, 1, torch.device("cpu"))
    save_checkpoint(run)  # step 0: fine
    name, p = next((n, p) for n, p in run.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    run.step = 1
    with pytest.raises(UsageError, match=rf"the adapters are no longer finite at step 1 \({name} holds NaN or inf; "
                                         rf"{out / 'checkpoint.pth'} is the last good checkpoint\)"):
        save_checkpoint(run)
    assert torch.load(out / "checkpoint.pth", weights_only=False)["step"] == 0


def test_a_test_question_too_long_is_skipped_and_counted_not_fatal(tmp_path, tiny_set):
    """One test problem longer than max_seq_len: train.py's evaluation at the end and sample.py --run
    both finish, warn (one whole line) naming its problem id, and count it unparsed. Planted: the
    skip in evaluate.evaluate removed (generate.ContextTooLong, `prompt 0 takes ...`, stopped both)."""
    import json
    import re
    import shutil
    import subprocess
    import sys

    from tests.helpers import ROOT

    root = tmp_path / "set"
    shutil.copytree(tiny_set, root)
    pid = json.loads((root / "pid_splits.json").read_text())["test"][0]
    edit_json(root / "problems.json", lambda p: p[pid].update(question="How many words is this? " + "word " * 300))
    out = tmp_path / "out"
    r = run_cli("--dataset", "shapes", "--data_path", str(root), "--output_dir", str(out), "--max_steps", "1",
                "--batch_size", "4", "--effective_batch", "8", "--eval_batch_size", "18")
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [line for line in r.stderr.split("\n") if "and were skipped" in line]  # tqdm's \r stays
    assert len(warned) == 1 and re.fullmatch(rf"warning: 1 prompt\(s\) of shapes/test take max_seq_len=256 positions "
                                             rf"or more and were skipped, answered with an empty text \(unparsed in "
                                             rf"ScienceQA's table\): problem {pid} \(\d+\)", warned[0]), warned
    result = json.loads((out / "results.json").read_text())
    assert json.loads((out / "preds.json").read_text())[pid] == -1 and result["unparsed"] >= 1 and result["n"] == 18
    s = subprocess.run([sys.executable, "sample.py", "--run", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]
    assert f"problem {pid} (" in s.stderr and json.loads((out / "eval-test" / "results.json").read_text()) == result


def test_ctrl_c_in_the_evaluation_at_the_end_says_how_to_finish_it(tmp_path, tiny_set):
    """A real SIGINT once the evaluation has begun: exit 130, the adapters kept, one line naming
    `python sample.py --run DIR`. Planted: finish() without its except (a bare `interrupted`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train.py", "--dataset", "shapes", "--data_path", str(tiny_set),
                          "--output_dir", str(out), "--max_steps", "1", "--batch_size", "4", "--effective_batch", "8",
                          "--eval_batch_size", "1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen, deadline = "", time.time() + 120
    while "evaluating:" not in seen:  # tqdm's bar: the evaluation has begun
        ch = p.stderr.read(1)
        assert ch and time.time() < deadline, seen[-2000:]
        seen += ch
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted during the evaluation: the trained adapters are saved in {out / 'adapters.pth'}; finish it "
        f"with  python sample.py --run {out} --dataset shapes --data_path {tiny_set} --split test --output_dir {out}")
    assert (out / "adapters.pth").exists() and not (out / "results.json").exists()
    command = err.strip().splitlines()[-1].split("finish it with  ")[1].split()  # and it does
    r = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (out / "results.json").exists() and (out / "preds.json").exists(), r.stderr[-2000:]


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_help_shows_each_flag_once_with_its_real_choices(script):
    """Planted: sample.py's choices shown as checked ({,scienceqa,...}, {0,16,8,4}); a bool field
    that defaults to True given --no-NAME twice (--no_compile / --no-no_compile)."""
    import dataclasses
    import re
    import subprocess
    import sys

    from sample import SampleConfig
    from tests.helpers import ROOT
    from train import TrainConfig

    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    options = r.stdout.split("options:")[1]
    entries = re.findall(r"^  (--\S+?)(?:,| |\n)", options, flags=re.M)
    names = [f.name for f in dataclasses.fields(TrainConfig if script == "train.py" else SampleConfig)]
    assert entries == [f"--{n}" for n in names]  # one entry a field, in order (-h, --help comes first)
    assert "{," not in r.stdout and ",}" not in r.stdout and "--no-no_" not in r.stdout
    if script == "sample.py":
        for shown in ("--dataset {scienceqa,shapes,mme,alpaca,coco}", "--bits {16,8,4}", "--image_mode {lavin,clip}"):
            assert shown in r.stdout


def test_a_lone_skipped_step_is_no_reason_to_stop(tmp_path, tiny_set):
    """One NaN step (a batch whose answers the cut removed) just before a checkpoint does not stop
    a run; an epoch of them does, and so does a run of nothing else at its end. Planted: the
    streak counted since the last checkpoint only (--save_interval 1 then stopped healthy runs)."""
    import train
    from checkpoint import unusable
    from tests.helpers import config

    run = train.setup(resolve(config(tiny_set, tmp_path / "out")), 0, 1, torch.device("cpu"))  # 3 steps an epoch
    run.step, run.nan_streak = 4, 1
    assert unusable(run) == ""
    run.nan_streak = 2
    assert unusable(run) == ""
    run.nan_streak = 3
    assert unusable(run).startswith("the loss was NaN or inf at every step since step 1 (3 steps)")
    run.step = run.stop = run.nan_streak = 2  # a two-step run, both skipped
    assert unusable(run).startswith("the loss was NaN or inf at every step since step 0 (2 steps)")


def test_a_picture_over_the_pixel_limit_is_refused_when_the_images_are_checked(tmp_path, tiny_set, monkeypatch):
    """A valid 100-Mpixel PNG (1-bit, 12 MB): Pillow only warns below twice its limit, so verify()
    passed it and the DataLoader refused it hours later. Checked up front now, with the same rule
    as clip.load_image; Image.MAX_IMAGE_PIXELS = None (Pillow's way to lift the limit) lifts it.
    Planted: check_images with plain Image.open; open_checked without its None guard."""
    import shutil

    from PIL import Image

    import clip
    import train

    root = tmp_path / "set"
    shutil.copytree(tiny_set, root)
    problems = json.loads((root / "problems.json").read_text())
    pid = next(p for p in json.loads((root / "pid_splits.json").read_text())["train"] if problems[p]["image"])
    big = root / "images" / "train" / pid / "image.png"
    Image.new("1", (10_000, 10_000)).save(big)
    ds = data.build_dataset("shapes", str(root), "train", Tokenizer(tiny_set / "tokenizer.model"), prompt_format="QCM-A")
    with pytest.raises(UsageError, match=rf"sample {pid}, .*DecompressionBombError: 10000x10000 pixels, more than "
                                         r"Pillow's decompression-bomb limit of 89478485"):
        train.check_images(ds, False, 0, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with clip.open_checked(big) as im:
        assert im.size == (10_000, 10_000)
