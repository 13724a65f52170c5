"""config.py: presets and flags, the output folders, --dry_run's counts, and the checks that turn bad
input into one line before any compute."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import train
from config import PRESETS
from tests.helpers import config, losses, run_cli
from train import TrainConfig, UsageError


ROOT = Path(__file__).resolve().parents[1]


def test_presets_follow_the_paper_and_flags_win(capsys):
    cfg, notes = train.make_config(["--preset", "lavin-7b"])
    assert (cfg.dataset, cfg.epochs, cfg.effective_batch, cfg.blr, cfg.warmup_epochs, cfg.weight_decay,
            cfg.max_seq_len, cfg.prompt_format, cfg.adapter_dim, cfg.temperature) == \
        ("scienceqa", 20, 32, 9e-3, 2.0, 0.02, 512, "QCM-ALE", 8, 10.0)
    assert notes == []
    assert train.make_config(["--preset", "lavin-13b"])[0].temperature == 5.0
    assert train.make_config(["--dataset", "scienceqa"])[0].preset == "lavin-7b"
    assert train.make_config(["--dataset", "instruct"])[0].preset == "chatbot-7b"
    cfg, notes = train.make_config(["--preset", "lavin-13b", "--temperature", "10", "--epochs", "3"])
    assert (cfg.temperature, cfg.epochs) == (10.0, 3)
    assert any("--temperature 10.0 overrides preset lavin-13b's temperature=5.0" in n for n in notes)
    with pytest.raises(UsageError, match="unknown preset 'lavin-70b': use one of lavin-7b, lavin-13b"):
        train.make_config(["--preset", "lavin-70b"])
    with pytest.raises(UsageError, match="unknown dataset 'imagenet': use one of scienceqa, shapes, instruct"):
        train.make_config(["--dataset", "imagenet"])


# LLaMA-7B (32 blocks of 4096) and ViT-L (24 of 1024), adapters of width 8 in 2 groups: per block
# down d*8+8, each up d*8/2+d, router 2d+2; the neck 1024*128+128 + 128*4096+4096; modality 2*4096.
@pytest.mark.parametrize("preset,count", [
    ("lavin-7b", "3,781,296"), ("lavin-13b", "5,390,080"), ("lavin-llama3-8b", "3,781,296"),
    ("chatbot-llama3-8b", "3,781,296"),
    ("lavin-7b --no_visual", f"{32 * (32776 + 2 * 20480 + 8194) + 8192:,}"),  # LLaMA's adapters alone
    ("lavin-7b --no_router", f"{32 * (32776 + 20480) + 24 * (8200 + 5120) + 659584:,}")])  # one up-projection
def test_dry_run_prints_the_papers_parameter_counts_without_files(preset, count, tmp_path):
    r = run_cli("--preset", *preset.split(), "--dry_run", "--llama_path", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    trainable = [line for line in r.stdout.splitlines() if line.startswith("trainable")]
    assert trainable and trainable[0].split()[-1] == count


def test_lite_dry_run_prints_the_trainable_count_and_the_bytes_from_the_config(tmp_path):
    r = run_cli("--preset", "lavin-7b-lite", "--dry_run", "--llama_path", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert next(x for x in lines if x.startswith("trainable")).split()[-1] == "3,781,296"  # unchanged
    four = next(x for x in lines if x.startswith("frozen LLaMA at 4 bits"))
    sixteen = next(x for x in lines if x.startswith("frozen LLaMA at 16 bits"))
    assert "3,865,836,416 bytes" in four and "this run" in four  # the exact count test_bytes_... spells out
    assert "13,476,831,232 bytes" in sixteen


def test_an_ablation_never_writes_over_the_full_run():
    outs = {flags: train.resolve(train.make_config(["--dataset", "shapes", *flags])[0]).output_dir
            for flags in [(), ("--no_visual",), ("--no_router",), ("--no_visual", "--no_router")]}
    assert list(outs.values()) == ["out/shapes", "out/shapes-no_visual", "out/shapes-no_router",
                                   "out/shapes-no_visual-no_router"]


def test_the_output_folders_the_readme_names():
    from config import make_config, resolve

    def out(*argv):
        return resolve(make_config(list(argv))[0]).output_dir

    assert out("--dataset", "shapes") == "out/shapes" and out("--dataset", "shapes", "--bits", "4") == "out/shapes-4bit"
    assert out("--dataset", "shapes", "--no_router") == "out/shapes-no_router"
    assert out("--preset", "lavin-7b-lite") == "out/lavin-7b-lite"  # its own bits: no suffix
    assert out("--preset", "lavin-7b-lite", "--bits", "16") == "out/lavin-7b-lite-16bit"
    assert out("--preset", "lavin-13b-lite", "--output_dir", "x") == "x"


def test_every_flag_has_its_help():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for f in dataclasses.fields(TrainConfig):
        after = r.stdout.split(f"--{f.name}", 2)[-1].split("\n  --")[0]  # the flag's entry in the options list
        assert len(after.split()) >= 3, f"--{f.name} has no help: {after!r}"
    for flag, shown in (("dataset", "{scienceqa,shapes,instruct,shapes-chat,coco,shapes-coco}"), ("bits", "{16,8,4}"),
                        ("precision", "{auto,bf16,fp16,fp32}"), ("instruct_mode", "{recipe,multiturn}"),
                        ("image_mode", "{lavin,clip}")):
        assert f"--{flag} {shown}" in r.stdout
    assert "--preset {lavin-7b,lavin-13b,lavin-7b-lite,lavin-13b-lite," in r.stdout


def test_bits_3_is_one_line(tmp_path):
    r = run_cli("--dataset", "shapes", "--bits", "3", "--output_dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip() == "error: --bits 3: use 16, 8 or 4 (NF4, LaVIN-lite)"
    r = subprocess.run([sys.executable, "sample.py", "--bits", "3", "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "argument --bits: invalid choice: 3" in r.stderr


def test_chat_flags_and_presets(chat_set, tmp_path):
    cfg, _ = train.make_config(["--dataset", "shapes-chat", "--instruct_mode", "multiturn"])
    assert cfg.preset == "shapes-chat" and cfg.instruct_mode == "multiturn"
    with pytest.raises(UsageError, match="unknown --instruct_mode 'chat'"):
        train.resolve(train.make_config(["--dataset", "shapes-chat", "--instruct_mode", "chat"])[0])
    c13 = train.resolve(train.make_config(["--preset", "chatbot-13b", "--dataset", "instruct"])[0])
    assert (c13.llama_path, c13.temperature, c13.epochs, c13.warmup_epochs) == ("weights/vicuna-13b", 5.0, 15, 0.2)
    assert c13.coco_root == "data/instruct/train2014" and PRESETS["chatbot-7b"].flags["temperature"] == 10.0
    bad = train.make_config(["--dataset", "shapes-chat", "--data_path", str(chat_set),
                             "--coco_root", str(tmp_path / "coco"), "--output_dir", str(tmp_path / "o")])[0]
    with pytest.raises(UsageError, match=f"no COCO train2014 folder at {tmp_path / 'coco'}.*--coco_root"):
        train.main(bad)


def test_missing_scienceqa_release_names_the_layout(tiny_set, tmp_path):
    cfg = config(tiny_set, tmp_path, dataset="scienceqa", preset="lavin-7b", data_path=str(tmp_path / "sqa"),
                 llama_path=str(tiny_set / "llama"), clip_path=str(tiny_set / "clip" / "ViT-tiny.pt"))
    with pytest.raises(UsageError, match="no ScienceQA release in .*problems.json, pid_splits.json"):
        train.main(cfg)


def test_a_second_run_into_a_used_folder_is_refused(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=2))
    with pytest.raises(UsageError, match=f"{out} already holds a run .*--resume {out / 'checkpoint.pth'}.*--output_dir"):
        train.main(config(tiny_set, out, max_steps=1))
    assert len(losses(out)) == 2  # untouched
    train.main(config(tiny_set, out, max_steps=1, overwrite=True))
    assert len(losses(out)) == 1  # a new log, not one appended to the old


def test_a_folder_holding_only_a_log_is_refused_too(tiny_set, tmp_path):
    """A run that died before its first checkpoint leaves log.jsonl alone: still a run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UsageError, match=rf"{out} already holds a run \(log.jsonl\)"):
        train.main(config(tiny_set, out, max_steps=1))
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
