"""LaVIN-lite from the command line: train.py and sample.py with --bits, the lite presets, and
the 4-bit decode compiled (quant.py's numerics: test_quant.py)."""
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import quant
from lavin import LaVINArgs, load_lavin

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = "data/shapes_backbones"


def test_lite_dry_run_prints_the_trainable_count_and_the_bytes_from_the_config(tmp_path):
    from tests.test_train import run_cli

    r = run_cli("--preset", "lavin-7b-lite", "--dry_run", "--llama_path", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert next(x for x in lines if x.startswith("trainable")).split()[-1] == "3,781,296"  # unchanged
    four = next(x for x in lines if x.startswith("frozen LLaMA at 4 bits"))
    sixteen = next(x for x in lines if x.startswith("frozen LLaMA at 16 bits"))
    assert "3,865,836,416 bytes" in four and "this run" in four  # the exact count test_bytes_... spells out
    assert "13,476,831,232 bytes" in sixteen


def test_bits_3_is_one_line(tmp_path):
    from tests.test_train import run_cli

    r = run_cli("--dataset", "shapes", "--bits", "3", "--output_dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip() == "error: --bits 3: use 16, 8 or 4 (NF4, LaVIN-lite)"
    r = subprocess.run([sys.executable, "sample.py", "--bits", "3", "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "argument --bits: invalid choice: 3" in r.stderr


def test_train_at_4_bits_then_sample_the_run(tiny_set, tmp_path, capsys):
    """A lite run end to end: its adapters say 4 bits, sample.py --run loads the LLaMA at 4 bits by
    itself, keeps the adapters unfolded (said once) and answers; at --bits 16 it warns."""
    import sample
    import train
    from tests.test_train import config

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


def test_two_processes_at_4_bits_equal_one(tiny_set, tmp_path):
    """DDP over a quantized LLaMA: 2 Gloo processes with batch 2 give 1 process's losses at batch 4."""
    import train
    from tests.test_train import config, losses, run_two

    run_two(tmp_path / "two", "--data_path", str(tiny_set), "--epochs", "2", "--effective_batch", "8",
            "--adapter_dropout", "0", "--skip_eval", "--bits", "4", "--max_steps", "3", "--batch_size", "2")
    train.main(config(tiny_set, tmp_path / "one", adapter_dropout=0.0, bits=4, max_steps=3))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=0)


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: a minute on a cold cache
def test_compiled_decode_at_4_bits_gives_the_eager_tokens():
    """sample.py --compile --bits 4: the fixed-shape decode step over NF4 weights, compiled, decodes
    the eager tokens (fp32 on the CPU), for image and text rows of different lengths."""
    from generate import StaticDecoder, generate

    torch.manual_seed(0)
    model, tok = load_lavin(f"{BACKBONES}/llama", f"{BACKBONES}/clip/ViT-tiny.pt", LaVINArgs(), bits=4, max_seq_len=96)
    model.eval()
    prompts = [tok.encode(p, bos=True, eos=False) for p in
               ("Question: Which color is the circle?\nOptions: (A) red (B) green\nAnswer:", "Question: What is 2+2?")]
    r = model.visual.resolution
    images = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(2))
    ind = torch.tensor([1, 0])
    want = generate(model, tok, prompts, images, ind, max_new_tokens=12)
    assert generate(model, tok, prompts, images, ind, max_new_tokens=12, decoder=StaticDecoder(model.llama)) == want


@pytest.mark.parametrize("bits", [4, 8])
def test_a_compiled_lite_block_saves_no_dequantized_weight_for_the_backward(bits):
    """What a compiled block's forward graph hands its backward, as inductor partitions it (the
    min-cut partitioner; no kernels are generated here): the codes, never a 16-bit weight. Traced
    as QuantMatmul, the two dequantizations merged and the weight was saved, in every layer of
    every block, gradient checkpointing or not (LaVIN-7B-lite on a GPU: +11.6 GiB)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from tests.test_lavin import batch
    from tests.test_quant import lite

    saved = []

    def forward_graph(gm, example_inputs):  # its outputs: the block's, then what the backward keeps
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.append([n.meta["val"] for n in outputs if hasattr(n, "meta") and "val" in n.meta])
        return gm.forward

    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=lambda gm, _: gm.forward,
                           partition_fn=min_cut_rematerialization_partition)
    for checkpointing in (False, True):
        torch._dynamo.reset()
        saved.clear()
        model = lite(bits, adapter_dropout=0.0).train()
        model.llama.grad_checkpointing = checkpointing
        sizes = {m.in_features * m.out_features for m in model.llama.modules() if isinstance(m, quant.QuantLinear)}
        for block in model.llama.layers:
            block.compile(backend=backend)
        tokens, images, ind, labels = batch()  # activations of 3 x 7 x 64: no weight's size
        model(tokens, images, ind, labels).backward()
        assert len(saved) >= 1 and all(any(t.dtype in (torch.uint8, torch.int8) for t in s) for s in saved)
        full = [tuple(t.shape) for s in saved for t in s if t.is_floating_point() and t.numel() in sizes]
        assert full == [], f"saved for the backward, the size of a weight: {full}"


@pytest.mark.parametrize("bits", [4, 8])
def test_decoding_compiled_reads_the_codes_and_gives_the_dequantized_matmul(bits):
    """A decode step's row without gradients, compiled: quant.fused_matvec, whose sums over the
    codes inductor fuses into kernels that write no buffer of the weight's size (the one
    dequantized weight would be 96 x 256). The result is x W^T to fp32 rounding (float64 reference)."""
    import re

    from torch._inductor.utils import run_and_get_code

    layer = quant.QuantLinear.from_weight(torch.randn(96, 256, generator=torch.Generator().manual_seed(0)), bits)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(1))
    want = x.double() @ layer.dequantize(torch.float64).t()
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(layer), x)
        eager = quant.fused_matvec(x, (96, 256), *layer.buffers_in_order())
    tolerance = 1e-5 * want.abs().max().item()  # fp32 sums of 256 products, in any order
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance)
    torch.testing.assert_close(eager.double(), want, rtol=0, atol=tolerance)
    buffers = [math.prod(int(d) for d in re.findall(r"\d+", shape))
               for shape in re.findall(r"empty_strided\w*\(\(([\d, ]*)\)", "\n".join(code))]
    assert buffers and max(buffers) < 96 * 256 // 2, buffers  # the largest: the output's or the partial sums'


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU
@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_fused_decode_gives_the_eager_tokens(bits):
    """A LaVIN whose widths are whole blocks of 64 (so the fused path runs), decoded compiled in
    fp32 on the CPU: the eager tokens, for image and text rows."""
    from generate import StaticDecoder, generate
    from tests.test_lavin import batch
    from tests.test_quant import lite

    model = lite(bits).eval()
    tokens, images, ind, _ = batch()
    prompts = [row.tolist() for row in tokens]
    tok = types.SimpleNamespace(eos_id=-1, bos_id=1, decode=lambda ids: "")  # no EOS: every step is compared
    want = generate(model, tok, prompts, images, ind, max_new_tokens=12)
    assert generate(model, tok, prompts, images, ind, max_new_tokens=12, decoder=StaticDecoder(model.llama)) == want
