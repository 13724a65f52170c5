"""evaluate.py: early-stopped evaluation, the split sharded over ranks (two real processes), the
batches' room, the files it writes; compiled, as eager."""
import json
import types
from pathlib import Path

import pytest
import torch

import data
from data.table import parse_answer
from evaluate import evaluate, evaluate_split
from generate import ContextTooLong
from lavin import LaVINArgs
from tests.helpers import eos_is, random_lavin


def test_early_stop_gives_the_full_decode_predictions_in_a_fifth_of_the_steps(world):
    full, early = {}, {}
    texts_full = evaluate(world.model, world.tok, world.task, batch_size=8, early_stop=False, stats=full, progress=False)
    texts = evaluate(world.model, world.tok, world.task, batch_size=8, early_stop=True, stats=early, progress=False)
    n = {pid: len(world.problems[pid]["choices"]) for pid in texts}
    preds = {pid: parse_answer(t, n[pid]) for pid, t in texts.items()}
    assert preds == {pid: parse_answer(t, n[pid]) for pid, t in texts_full.items()}
    assert len(set(preds.values())) >= 3  # two letters or more, and unparsed rows (D ends in EOS)
    assert all(t.startswith("The answer is ") for t in texts.values())
    assert early["row_steps"] / early["problems"] <= 64 / 5  # the reference decodes 64 tokens per problem
    assert full["row_steps"] > 4 * early["row_steps"]


def test_ranks_shard_the_split(world):
    whole = evaluate(world.model, world.tok, world.task, batch_size=4, progress=False)
    parts = [evaluate(world.model, world.tok, world.task, batch_size=4, rank=r, world_size=2, progress=False)
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and {**parts[0], **parts[1]} == whole
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_evaluate_split_writes_preds_results_and_prints_the_table(world, tmp_path, capsys):
    result = evaluate_split(world.model, world.tok, world.task, batch_size=16, output_dir=str(tmp_path), progress=False)
    preds = json.loads((tmp_path / "preds.json").read_text())
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text()) == result
    assert set(preds) == set(outputs) == {s.pid for s in world.ds.samples}
    assert preds == {pid: parse_answer(t, len(world.problems[pid]["choices"])) for pid, t in outputs.items()}
    assert result["unparsed"] == sum(p == -1 for p in preds.values()) > 0
    assert result["decode_steps_per_problem"] <= 64 / 5 and result["reference_steps_per_problem"] == 64
    shown = capsys.readouterr().out
    assert "NAT" in shown and "Avg" in shown and "decode steps per problem" in shown


def test_a_callers_smaller_max_new_tokens_wins_over_the_tasks_cap(world, tmp_path):
    """A task's own cap (MME's 20) bounds the caller's max_new_tokens, never raises it; and the
    model comes back in the mode it came in."""
    capped = types.SimpleNamespace(**{k: getattr(world.task, k) for k in ("name", "split", "dataset", "stop",
                                                                          "score", "table")}, max_new_tokens=5)
    model = random_lavin(world.tok, seed=2)
    for asked, budget in ((3, 3), (64, 5)):
        for training in (True, False):
            model.train(training)
            result = evaluate_split(model, world.tok, capped, output_dir=str(tmp_path / f"{asked}"),
                                    max_new_tokens=asked, early_stop=False, progress=False)
            assert model.training is training and all(m.training is training for m in model.modules())
        assert result["reference_steps_per_problem"] == budget
        assert result["decode_steps_per_problem"] == budget  # no early stop, no EOS: every row decodes the budget


class Prompts:
    """An evaluation task of given prompt lengths (text only), for the loop's own behaviour."""

    name, split = "lengths", "test"

    def __init__(self, tok, lengths):
        samples = [data.Sample(str(i), ((("x " * n).strip(), "A"),), None) for i, n in enumerate(lengths)]
        self.dataset = data.TokenizedDataset(samples, tok)

    def stop(self, text):
        return False


def test_a_batch_gets_the_room_of_its_longest_prompt_longest_batch_first(world, monkeypatch):
    import evaluate  # the module, whose generate is patched (at the top: the function)
    model, tok = random_lavin(world.tok, max_seq_len=120), world.tok
    task = Prompts(tok, [3, 4, 50, 5, 2, 6])
    size = {s.pid: len(tok.encode(s.turns[0][0], bos=True, eos=False)) for s in task.dataset.samples}
    assert max(size.values()) + len(model.prefix_text) > 120 - 16  # the long one cannot have 16 new tokens
    batches = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, *a, **k: (batches.append(prompts),
                                                                             real(m, t, prompts, *a, **k))[1])
    texts = evaluate.evaluate(model, tok, task, batch_size=3, max_new_tokens=16, progress=False)
    assert set(texts) == set(size)
    assert max(map(len, batches[0])) == max(size.values())  # the longest batch first
    with pytest.raises(ContextTooLong):  # the check the batch budget keeps clear of
        real(model, eos_is(tok, -1), batches[0], max_new_tokens=16)


def _eval_worker(rank, world, init_file, root, out, results):
    import torch.distributed as dist

    import evaluate
    from model import Tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = Tokenizer(Path(root) / "tokenizer.model")
        task = data.evaluation("shapes", root, "test", tok, resolution=32)
        result = evaluate.evaluate_split(random_lavin(tok), tok, task, output_dir=out, batch_size=4, rank=rank,
                                         world_size=world, progress=False)
        results.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_two_processes_evaluate_as_one(world, tmp_path):
    import torch.multiprocessing as mp

    import evaluate  # the module (at the top: the function)

    one = evaluate.evaluate_split(random_lavin(world.tok), world.tok, world.task, output_dir=str(tmp_path / "one"),
                                  batch_size=4, progress=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_eval_worker, args=(r, 2, tmp_path / "init", str(world.root), str(tmp_path / "two"),
                                                    results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[1] is None and got[0] == one
    assert json.loads((tmp_path / "two" / "outputs.json").read_text()) == \
        json.loads((tmp_path / "one" / "outputs.json").read_text())


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: a minute
def test_a_compiled_run_evaluates_as_an_eager_one(tiny_set):
    """The end of train.py on a GPU: the blocks compiled for training (lavin.compile_blocks), then
    the evaluation with the compiled decoder; the texts are those of the eager model, fp32."""
    import data
    from evaluate import evaluate
    from lavin import compile_blocks, load_lavin

    model, tok = load_lavin(tiny_set / "llama", tiny_set / "clip" / "ViT-tiny.pt", LaVINArgs(), max_seq_len=256)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # trained adapters, not the identity
            torch.nn.init.normal_(p, std=0.05)
    task = data.evaluation("shapes", str(tiny_set), "test", tok, prompt_format="QCM-A",
                           resolution=model.visual.resolution)
    kw = dict(batch_size=8, early_stop=False, max_new_tokens=8, progress=False)
    want = evaluate(model.eval(), tok, task, **kw)
    compile_blocks(model)
    assert evaluate(model, tok, task, compile=True, **kw) == want
