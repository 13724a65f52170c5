"""Behaviours no test guarded (issue 34's survivors: bugs planted there went unnoticed): the thread
policy's own thread, the optimizer a GPU run takes, compile_blocks' reach, the 4-bit layers'
compiled branches, the compiled decoder's caches, data.captions' warnings before its refusal.
Each test names the bug it was checked against."""
import subprocess
import sys

import pytest
import torch

import quant
import train
from clip import VisionTransformer
from generate import StaticDecoder, generate
from lavin import LaVIN, LaVINArgs, compile_blocks
from model import Llama
from runtime import free_cores, others_running
from tests.helpers import PREFIX_IMG, PREFIX_TXT, ROOT, batch, random_state, tiny_args, tiny_lavin, write_karpathy
from train import TrainConfig


def test_the_runs_own_thread_is_not_other_load(tmp_path):
    """/proc/stat's procs_running counts the thread that reads it: one running task is this one,
    and a run on idle cores takes them all. Planted: others_running without its `- 1` (an idle
    2-core machine then gave a run 1 thread)."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nprocs_running 1\nprocs_blocked 0\n")
    assert others_running(samples=3, interval=0.0, stat=str(stat)) == 0
    assert free_cores(2, others_running(samples=3, interval=0.0, stat=str(stat)), 2) == 2
    stat.write_text("procs_running 3\n")  # two other tasks: one core of two left, at least one thread
    assert others_running(samples=3, interval=0.0, stat=str(stat)) == 2 and free_cores(2, 2, 2) == 1


def test_a_gpu_run_takes_fused_adamw_a_cpu_run_foreach():
    """Planted: make_optimizer's device test inverted (fused on the CPU, foreach on CUDA)."""
    model = tiny_lavin()
    on_gpu = train.make_optimizer(model, TrainConfig(), 1e-3, torch.device("cuda")).defaults
    on_cpu = train.make_optimizer(model, TrainConfig(), 1e-3, torch.device("cpu")).defaults
    assert (on_gpu["fused"], on_gpu["foreach"]) == (True, False)
    assert (on_cpu["fused"], on_cpu["foreach"]) == (False, True)


def test_compile_blocks_compiles_every_block_of_both_towers():
    """Planted: compile_blocks over the LLaMA's layers alone."""
    model = tiny_lavin()
    compile_blocks(model)
    blocks = [*model.llama.layers, *model.visual.transformer.resblocks]
    assert len(model.visual.transformer.resblocks) > 0
    assert all(b._compiled_call_impl is not None for b in blocks)  # what nn.Module.compile sets


@pytest.mark.parametrize("bits", [4, 8])
def test_a_compiled_4bit_layer_of_a_partial_block_width_takes_the_dequantized_matmul(bits):
    """in_features 96, not whole blocks of 64: compiled, a decode row takes dequantize-then-multiply
    and gives x W^T (float64 reference from the dequantized weight). Planted: the fused sums
    allowed whatever the width (NF4's view by blocks of 64 then fails)."""
    layer = quant.QuantLinear.from_weight(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)), bits)
    x = torch.randn(1, 2, 96, generator=torch.Generator().manual_seed(1))
    want = x.double() @ layer.dequantize(torch.float64).t()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, backend="eager", fullgraph=True)(x)  # traced: the compiled branch
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_the_compiled_decoder_keeps_one_cache_per_batch_size_and_dtype():
    """Planted: StaticDecoder.cache making a fresh max-length cache for every batch."""
    d = StaticDecoder(tiny_lavin().llama, compile=False)
    first = d.cache(4, None, torch.float32)
    again = d.cache(4, torch.tensor([0, 1, 2, 0]), torch.float32)
    assert again is first and again.len == 0 and again.padded  # emptied, the new padding
    assert d.cache(2, None, torch.float32) is not first and d.cache(4, None, torch.bfloat16) is not first
    assert len(d.caches) == 3


@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_4bit_decoding_of_a_96_wide_llama_gives_the_eager_tokens(bits):
    """The shipped tiny LLaMA's width (96: no whole blocks of 64) through the compiled decode step
    (traced by dynamo, run without building kernels): the eager tokens. Planted as above."""
    torch.manual_seed(0)
    args = tiny_args(vocab_size=50, dim=96, n_heads=4, n_kv_heads=2)
    llama = Llama(args)
    llama.load_state_dict(random_state(args, 0))
    visual = VisionTransformer(resolution=32, patch_size=8, width=64, layers=8, output_dim=16)
    model = LaVIN(LaVINArgs(), llama, visual, PREFIX_IMG, PREFIX_TXT).eval()
    quant.quantize_(model.llama.layers, bits)
    tokens, images, ind, _ = batch()
    prompts = [row.tolist() for row in tokens]
    tok = type("NoEos", (), {"eos_id": -1, "stop_ids": set(), "bos_id": 1, "decode": lambda self, ids: ""})()
    torch._dynamo.reset()
    want = generate(model, tok, prompts, images, ind, max_new_tokens=6)
    got = generate(model, tok, prompts, images, ind, max_new_tokens=6, decoder=StaticDecoder(model.llama, backend="eager"))
    assert got == want


def test_captions_warns_of_stray_ids_and_empty_captions_before_refusing_a_file(tmp_path):
    """Planted: the warnings printed after score() (which raised first: they were never seen)."""
    import json

    root = write_karpathy(tmp_path / "coco")
    (tmp_path / "p.json").write_text(json.dumps({"1": "", "9": "a stray caption", "2": 5}))
    r = subprocess.run([sys.executable, "-m", "data.captions", "--data", str(root), "--split", "test", "--preds",
                        str(tmp_path / "p.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "warning: 1 caption(s) for images not in split test, left out: cocoid 9",
        "warning: 1 empty caption(s), scored as they are: cocoid 1",
        "error: the caption of cocoid 2 should be a string, got 5"], r.stderr
