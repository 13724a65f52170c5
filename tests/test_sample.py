"""sample.py: a prompt, a chat, a run's evaluation, and the errors a user sees, on the models and run
folder of the `world` fixture (conftest.py)."""
import copy
import dataclasses
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from generate import Stream, generate
from lavin import LaVINArgs, save_adapters
from router import IMAGE
from sample import SampleConfig, UsageError, converse, main, make_config, resolve, typed_lines
from tests.formats import png_header, write_meta
from tests.helpers import official_checkpoint, random_lavin, random_state, tiny_args


ROOT = Path(__file__).resolve().parents[1]


def test_prompt_streams_exactly_what_it_returns(world, capsys):
    sample = next(s for s in world.ds.samples if s.image)
    question = sample.turns[0][0]
    cfg = SampleConfig(run=str(world.run), image=sample.image, prompt=question.replace("\n", "\\n"))
    answer = main(cfg)
    assert capsys.readouterr().out == answer + "\n"
    assert answer.startswith("The answer is ") and " " in answer  # sentencepiece's spaces survived
    image = world.ds.load_image(sample.pid, sample.image)[None]
    want = generate(world.model, world.tok, [world.tok.encode(question, bos=True, eos=False)], image,
                    torch.tensor([IMAGE]), 64)[0]  # unfolded, in memory; the CLI folds
    assert answer == world.tok.decode(want)


def test_stream_holds_back_half_a_character():
    tok = types.SimpleNamespace(decode=lambda ids: "".join(ids))
    shown = []
    stream = Stream(tok, write=shown.append)
    for ids in (["a"], ["a", "\ufffd"], ["a", "é"], ["a", "é", " b"], ["a", "é", " b", "\ufffd"]):
        stream(0, ids)
    assert shown == ["a", "é", " b"]
    stream(0, ["a", "é", " b", "\ufffd"], final=True)  # the answer ended there: show it as it is
    assert shown == ["a", "é", " b", "\ufffd"]


def test_run_evaluates_its_own_dataset(world, capsys):
    result = main(SampleConfig(run=str(world.run), batch_size=8))
    out = world.run / "eval-test"
    assert json.loads((out / "results.json").read_text()) == result and result["n"] == len(world.ds)
    assert "Avg" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 1, 2])  # three models: one may not notice a token gone missing
def test_chat_keeps_the_cache_across_turns(world, capsys, seed):
    tok = world.tok
    model = random_lavin(tok, seed=seed)
    image = torch.randn(3, 32, 32)
    cfg = SampleConfig(template="instruction", max_new_tokens=6, fold=False)
    typed = typed_lines(reader(["What is in the picture?", "And its colour?", "", "never read"]))
    answers = converse(model, tok, cfg, image, typed)
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)
    # Turn 2 from scratch: BOS prompt1 answer1 EOS prompt2, the image inserted after BOS.
    turn1 = tok.encode("Instruction: What is in the picture?\nResponse:", bos=True, eos=False)
    turn2 = tok.encode("Instruction: And its colour?\nResponse:", bos=False, eos=False)
    first = generate(model, tok, [turn1], image[None], torch.tensor([IMAGE]), 6)[0]
    assert answers[0] == tok.decode(first) and len(first) == 6  # out of budget: no EOS was sampled
    want = generate(model, tok, [turn1 + first + [tok.eos_id] + turn2], image[None], torch.tensor([IMAGE]), 6)[0]
    assert answers[1] == tok.decode(want)
    # Folded, and ended by the end of input instead of an empty line: the same answers.
    typed = typed_lines(reader(["What is in the picture?", "And its colour?"]))
    assert converse(copy.deepcopy(model), tok, dataclasses.replace(cfg, fold=True), image, typed) == answers


def test_a_chat_answers_in_the_room_left_then_says_the_context_is_full(world, capsys):
    """max_seq_len 48: turn 2 is sized to leave room for 2 new tokens (of max_new_tokens 6), and
    gets them; turn 3 finds no room and says so in one line instead of failing in the KV cache."""
    tok, L = world.tok, 48
    model = random_lavin(tok, seed=1, max_seq_len=L)
    turn1 = tok.encode("Question: Which shape?\nResponse:", bos=True, eos=False)
    first = generate(model, tok, [turn1], max_new_tokens=6)[0]
    assert len(first) == 6 and tok.eos_id not in first  # no EOS: turn 2 then starts with the last token, EOS
    # After turn 1 the cache holds the prompt, "Image: N/A" and 5 of the answer's 6 tokens (the
    # last one is fed with turn 2); turn 2 feeds 2 + its own tokens and leaves room for 2 more.
    held = len(turn1) + int(model.inserted(torch.tensor([0]))) + 5
    words = []
    while len(tok.encode(" ".join(words), bos=False, eos=False)) < L - held - 2 - 2 + 1:
        words.append("red")
    turn2 = tok.encode(" ".join(words), bos=False, eos=False)
    assert held + 2 + len(turn2) - 1 + 2 == L  # the second answer's 2 tokens end at the context's end
    cfg = SampleConfig(template="raw", max_new_tokens=6, fold=False)
    answers = converse(model, tok, cfg, None, ["Question: Which shape?\\nResponse:", " ".join(words), "more?"])
    roomier = random_lavin(tok, seed=1, max_seq_len=L + 8)  # the same weights: generate keeps one slot spare
    want = generate(roomier, tok, [turn1 + first + [tok.eos_id] + turn2], max_new_tokens=2)[0]
    assert answers == [tok.decode(first), tok.decode(want)] and len(want) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"(the conversation fills the context of {L} positions: start a new chat)"


@pytest.mark.parametrize("template", ["raw", "instruction"])
def test_prompt_templates(world, template):
    tok, model = world.tok, random_lavin(world.tok)
    cfg = SampleConfig(template=template, max_new_tokens=5, fold=False)
    text = "Question: Which shape?\\nResponse:"  # as typed on a command line
    prompt = "Question: Which shape?\nResponse:"
    ids = tok.encode(prompt if template == "raw" else f"Instruction: {prompt}\nResponse:", bos=True, eos=False)
    want = generate(model, tok, [ids], max_new_tokens=5)[0]  # text only
    assert converse(model, tok, cfg, None, [text]) == [tok.decode(want)]


def reader(lines):
    """input() replayed: the lines, then EOFError."""
    lines = iter(lines)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    return read


def test_flags_become_the_config():
    cfg = make_config(["--run", "out/x", "--no-early_stop", "--temperature", "0.1", "--dataset", "shapes"])
    assert cfg.run == "out/x" and cfg.early_stop is False and cfg.temperature == 0.1 and cfg.dataset == "shapes"
    assert make_config(["--compile"]).compile is True and make_config([]) == SampleConfig()


def other_size_checkpoint(world, tmp_path):
    """Our adapters.pth saved from a LaVIN with a 64-wide LLaMA (the scripted one is 192 wide)."""
    save_adapters(tmp_path / "small.pth", random_lavin(world.tok, n_layers=1, clip_layers=8), config={})
    return str(tmp_path / "small.pth")


@pytest.mark.parametrize("case, match", [
    ("missing image", "no image at"),
    ("unreadable image", "cannot read image"),
    ("huge image", r"huge.png: DecompressionBombError: 12000x12000 pixels, more than Pillow's decompression-bomb limit"),
    ("other size", r"small.pth: llama.layers.0.adapter_attn.conv_A.weight has shape \(8, 64\), the model's is "
                   r"\(8, 192\) \(adapters for another model than"),
    ("long prompt", "exceeds max_seq_len=256"),
    ("missing weights", "no LLaMA checkpoint folder at"),
    ("missing run", "no adapters.pth there"),
    ("nothing to do", "nothing to do"),
])
def test_bad_input_is_one_clear_line(world, tmp_path, case, match):
    cfg = SampleConfig(run=str(world.run), prompt="Question: hi\\nResponse:")
    if case == "missing image":
        cfg.image = str(tmp_path / "nope.png")
    elif case == "unreadable image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        cfg.image = str(tmp_path / "bad.png")
    elif case == "huge image":  # planted: clip.load_image without its size check (it decoded 1.44 GB)
        (tmp_path / "huge.png").write_bytes(png_header(12_000, 12_000))
        cfg.image = str(tmp_path / "huge.png")
    elif case == "other size":
        cfg.adapters = other_size_checkpoint(world, tmp_path)
    elif case == "long prompt":
        cfg.prompt = "Question: " + "red blue " * 200 + "\\nResponse:"
    elif case == "missing weights":
        cfg.llama_path = str(tmp_path / "no_such_folder")
    elif case == "missing run":
        cfg.run = str(tmp_path)
    elif case == "nothing to do":
        cfg = SampleConfig(llama_path=str(world.root / "llama"), clip_path=str(world.root / "clip" / "tiny.pt"))
    with pytest.raises(UsageError, match=match) as e:
        main(cfg)
    assert "\n" not in str(e.value)


def test_command_line_error_has_no_traceback(world, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--run", str(world.run), "--image", str(tmp_path / "x.png"),
                        "--prompt", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()  # a note may come first (on busy cores: the threads taken)
    assert lines[-1] == f"error: no image at {tmp_path / 'x.png'}" and all(x.startswith("note: ") for x in lines[:-1])


def test_an_evaluation_runs_on_the_threads_of_its_run(world, tmp_path):
    """A laptop run trained on 1 thread (its preset's) is evaluated on 1 thread, whatever the load,
    so `sample.py --run` prints the run's own table; --threads overrides it."""
    ckpt = torch.load(world.run / "adapters.pth", weights_only=False)
    ckpt["config"]["threads"] = 1
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "adapters.pth")
    assert resolve(SampleConfig(run=str(tmp_path / "run")))[0].threads == 1
    assert resolve(SampleConfig(run=str(tmp_path / "run"), threads=2))[0].threads == 2
    assert resolve(SampleConfig(run=str(world.run)))[0].threads == 0  # a run that fixed none
    torch.set_num_threads(2)  # conftest's fixture gives the next test its threads back
    main(SampleConfig(run=str(tmp_path / "run"), prompt="Question: hi\\nResponse:", max_new_tokens=2))
    assert torch.get_num_threads() == 1


def test_official_checkpoint_from_the_command_line(world, tmp_path):
    """checkpoint-19.pth of a 13B-style run (router temperature 5): the model is built to fit it."""
    import argparse

    from lavin import load_adapters, load_lavin

    args = tiny_args(n_kv_heads=None, vocab_size=world.tok.n_words)
    write_meta(tmp_path / "llama", dict(dim=64, n_layers=2, n_heads=4, vocab_size=-1, multiple_of=32),
               random_state(args, seed=5))
    (tmp_path / "tokenizer.model").write_bytes((world.root / "tokenizer.model").read_bytes())
    ns = argparse.Namespace(adapter_dim=8, temperature=5.0, hidden_proj=128, adapter_type="attn",
                            visual_adapter_type="router", adapter_scale=1.0, llm_model="13B")
    torch.save(official_checkpoint(None, args=ns), tmp_path / "checkpoint-19.pth")
    paths = dict(llama_path=str(tmp_path / "llama"), clip_path=str(world.root / "clip" / "tiny.pt"))
    answer = main(SampleConfig(**paths, adapters=str(tmp_path / "checkpoint-19.pth"), prompt="Question: hi?",
                               template="raw", max_new_tokens=5))
    model, tok = load_lavin(**paths, args=LaVINArgs(temperature=5.0), max_seq_len=512)
    load_adapters(model, tmp_path / "checkpoint-19.pth")
    want = generate(model.eval(), tok, [tok.encode("Question: hi?", bos=True, eos=False)], max_new_tokens=5)[0]
    assert answer == tok.decode(want)


@pytest.mark.parametrize("argv, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
    (["--top_p", "0"], "--top_p must be in"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_nonsense_flags_are_refused(argv, match):
    with pytest.raises(UsageError, match=match):
        make_config(argv)


def test_prompt_format_with_a_prompt_is_noted(world, capsys):
    main(SampleConfig(run=str(world.run), prompt="Question: hi\\nResponse:", prompt_format="QCM-A", max_new_tokens=2))
    assert "note: --prompt_format QCM-A shapes the prompts of an evaluation" in capsys.readouterr().err


def chat_process(world, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes((world.root / "images" / "test").glob("*/image.png").__next__().read_bytes())
    return subprocess.Popen([sys.executable, "sample.py", "--run", str(world.run), "--image", str(image), "--chat"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_chat_ends_cleanly_at_ctrl_d(world, tmp_path):
    p = chat_process(world, tmp_path)
    out, err = p.communicate("What is it?\n", timeout=120)  # then the end of input: Ctrl-D
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "(an empty line, Ctrl-D or Ctrl-C ends the chat)" in out and out.count("you> ") == 2
    assert out.endswith("\n")  # the shell's prompt starts a line of its own


def test_chat_ends_cleanly_at_ctrl_c(world, tmp_path):
    p = chat_process(world, tmp_path)
    seen = ""
    while "you> " not in seen:  # waiting for a line: now a real Ctrl-C
        ch = p.stdout.read(1)
        assert ch, p.stderr.read()
        seen += ch
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert (seen + out).endswith("\n")


# ----------------------------------------------------------------------------- the card's command as typed

def runs_folder(world, tmp_path, datasets: dict) -> Path:
    """tmp_path/out/NAME/adapters.pth for each NAME: dataset, the world's run saying it was trained on
    that dataset, written in this order (the last one the newest)."""
    import os

    ckpt = torch.load(world.run / "adapters.pth", weights_only=False)
    for i, (name, dataset) in enumerate(datasets.items()):
        (tmp_path / "out" / name).mkdir(parents=True)
        torch.save({**ckpt, "config": {**ckpt["config"], "dataset": dataset}}, tmp_path / "out" / name / "adapters.pth")
        os.utime(tmp_path / "out" / name / "adapters.pth", (1_000_000 + i, 1_000_000 + i))
    return tmp_path


def test_sample_image_alone_chats_with_the_newest_run_under_out(world, tmp_path):
    """`python sample.py --image cat.jpg`, typed in a folder whose out/ holds two runs: the newest
    answers, in a chat about the picture, and one line says which run that is."""
    cwd = runs_folder(world, tmp_path, {"newer-name-but-older": "shapes", "b": "shapes"})
    (cwd / "cat.jpg").write_bytes(next((world.root / "images" / "test").glob("*/image.png")).read_bytes())
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", "cat.jpg", "--max_new_tokens", "4"],
                       cwd=cwd, input="Question: What is it?\\nResponse:\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = [x for x in r.stderr.splitlines() if x.startswith("run: ")]
    assert said == [f"run: {Path('out', 'b')} (the newest under out/; --run picks another)"]
    assert "(an empty line, Ctrl-D or Ctrl-C ends the chat)" in r.stdout and r.stdout.count("you> ") == 2
    assert "this run answers its training format: Question: " in r.stdout  # a shapes run: raw prompts


def test_sample_without_any_run_names_the_command_that_trains_one(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", "cat.jpg"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: no trained run under out/ to talk to: train one with `python train.py --dataset shapes-chat` "
        "(minutes on a laptop), or give --run OUT"]


def test_a_picture_without_a_prompt_is_a_chat_for_a_chatbot_and_a_caption_for_a_caption_run(world, tmp_path):
    import data

    runs = runs_folder(world, tmp_path, {"chat": "shapes-chat"}) / "out"
    cfg, mode = resolve(SampleConfig(image="x.png"), runs)
    assert (mode, cfg.run, cfg.template) == ("chat", str(runs / "chat"), "instruction")
    runs = runs_folder(world, tmp_path / "c", {"caption": "shapes-coco"}) / "out"
    cfg, mode = resolve(SampleConfig(image="x.png"), runs)
    assert (mode, cfg.prompt, cfg.template) == ("prompt", data.coco.CAPTION_PROMPT, "raw")
    cfg, mode = resolve(SampleConfig(image="x.png", run=str(world.run)), runs)  # --run wins over the newest
    assert (mode, cfg.run, cfg.template) == ("chat", str(world.run), "raw")
