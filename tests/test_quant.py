"""quant.py (LaVIN-lite): NF4 with double quantization and int8, against naive references written
here in float64 loops; the quantized LLaMA loaded, trained and sampled at 4 and 8 bits, and
compiled: the codes, never a dequantized weight, kept for the backward and read by a decode step."""
import argparse
import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quant
from lavin import LLAMA_SIZES, LaVINArgs, llama_bytes, load_adapters, load_lavin, save_adapters
from model import Llama, load_llama
from quant import QuantLinear
from tests.formats import write_hf, write_meta
from tests.helpers import batch, lite, official_checkpoint, random_state, tiny_args, tiny_lavin


# QLoRA (Dettmers et al. 2023), appendix E: the 16 values of NF4, as published.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
BACKBONES = "data/shapes_backbones"


# ----------------------------------------------------------------------------- naive references

def nearest(x: float, code) -> int:
    """Index of the code value nearest to x, in exact arithmetic; a tie goes to the lower index."""
    best = 0
    for i, c in enumerate(code):
        if abs(x - c) < abs(x - code[best]):
            best = i
    return best


def scaled_f32(values, absmax) -> list:
    """values * (1 / absmax) in fp32 as the format computes it, clamped to [-1, 1]."""
    inv = np.float32(1.0) / np.float32(max(absmax, 1e-38))
    return [float(min(max(np.float32(v) * inv, -1.0), 1.0)) for v in values]


def dynamic_code_f64() -> list:
    """bitsandbytes' signed 8-bit dynamic code from its definition, in float64: for decade 10^(i-6),
    the midpoints of linspace(0.1, 1, 2^i + 1), both signs; then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        k = 2**i
        edges = [0.1 + 0.9 * j / k for j in range(k + 1)]
        for j in range(k):
            v = 10.0 ** (i - 6) * (edges[j] + edges[j + 1]) / 2
            values += [v, -v]
    return sorted(values)


def nf4_reference(w: torch.Tensor):
    """(packed bytes, absmax codes, nested absmax, offset, dequantized weight in float64), block by
    block and value by value: blocks of 64 in row-major order, double quantization in blocks of 256."""
    flat = [float(v) for v in w.flatten()]
    nf4 = [float(np.float32(c)) for c in QLORA_NF4]
    codes, absmax = [], []
    for b in range(0, len(flat), 64):
        block = flat[b:b + 64]
        absmax.append(max(abs(v) for v in block))
        codes += [nearest(s, nf4) for s in scaled_f32(block, absmax[-1])]
    packed = [codes[i] << 4 | codes[i + 1] for i in range(0, len(codes), 2)]
    offset = float(np.float32(sum(absmax) / len(absmax)))
    centred = [float(np.float32(a) - np.float32(offset)) for a in absmax]
    dyn = [float(np.float32(c)) for c in dynamic_code_f64()]
    q2, nested = [], []
    for b in range(0, len(centred), 256):
        block = centred[b:b + 256]
        nested.append(max(abs(v) for v in block))
        q2 += [nearest(s, dyn) for s in scaled_f32(block, nested[-1])]
    scale = [dyn[q] * nested[i // 256] + offset for i, q in enumerate(q2)]
    deq = [nf4[c] * scale[i // 64] for i, c in enumerate(codes)]
    return packed, q2, nested, offset, torch.tensor(deq, dtype=torch.float64).view(w.shape)


def known_weight(rows=160, cols=256, seed=0) -> torch.Tensor:
    """Gaussian rows of different scales, with planted cases: a block of zeros, a block whose absmax
    is 1 holding an exact tie between NF4 codes 7 and 8, and -absmax (code 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.05)
    w.view(-1)[64:128] = 0  # block 1: all zeros
    tie = float(np.float32(QLORA_NF4[8])) / 2  # exactly halfway between 0 and NF4[8] in fp32
    w.view(-1)[128:192] = torch.linspace(-0.5, 0.5, 64)
    w.view(-1)[128], w.view(-1)[129], w.view(-1)[130] = 1.0, tie, -1.0  # block 2: absmax 1
    return w


# ----------------------------------------------------------------------------- the format

def test_nf4_is_qlora_table_and_normal_quantiles():
    assert list(quant.NF4) == QLORA_NF4
    # QLoRA's construction: quantiles of N(0, 1) at linspace(delta, 1/2, 9) (8 positive) and
    # linspace(delta, 1/2, 8) (7 negative), an exact 0, normalised by the largest; delta = 0.9677083.
    ndtri = lambda p: float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))  # noqa: E731
    delta = 0.9677083
    pos = [ndtri(delta + (0.5 - delta) * j / 8) for j in range(8)]
    neg = [-ndtri(delta + (0.5 - delta) * j / 7) for j in range(7)]
    derived = sorted(v / max(pos) for v in pos + neg + [0.0])
    assert derived == pytest.approx(QLORA_NF4, abs=2e-7)


def test_dynamic_code_is_its_definition():
    code = quant.dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no value twice
    assert code.tolist() == pytest.approx(dynamic_code_f64(), rel=1e-6, abs=1e-12)
    assert code[-1] == 1.0 and 0.0 in code.tolist() and code[0] == pytest.approx(-0.99296875)


def test_nf4_by_hand():
    """One block, read off the table: 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than
    0.5626), 0.1 -> 8, an exact tie between 0 and 0.0796 -> 7 (the lower), -0.65 -> 1 (-0.6962)."""
    tie = float(np.float32(QLORA_NF4[8])) / 2
    w = torch.zeros(1, 64)
    w[0, :7] = torch.tensor([1.0, -1.0, 0.0, 0.5, 0.1, tie, -0.65])
    layer = QuantLinear.from_weight(w, 4)
    codes = torch.stack((layer.weight >> 4, layer.weight & 15), -1).flatten()
    assert codes[:8].tolist() == [15, 0, 7, 12, 8, 7, 1, 7]
    assert layer.weight[0].item() == 0xF0 and layer.weight[1].item() == 0x7C  # first code in the high nibble
    want = torch.tensor([1.0, -1.0, 0.0, QLORA_NF4[12], QLORA_NF4[8], 0.0, QLORA_NF4[1]])
    torch.testing.assert_close(layer.dequantize()[0, :7], want, rtol=1e-6, atol=1e-7)


def test_nf4_round_trip_equals_the_naive_reference():
    w = known_weight()  # 640 blocks of 64: 3 nested blocks of 256, the last one partial
    layer = QuantLinear.from_weight(w, 4)
    packed, q2, nested, offset, deq = nf4_reference(w)
    assert layer.weight.dtype == torch.uint8 and layer.weight.tolist() == packed
    assert layer.offset.item() == pytest.approx(offset, rel=1e-6)
    assert layer.absmax.tolist() == q2
    assert layer.nested_absmax.tolist() == pytest.approx(nested, rel=1e-6)
    torch.testing.assert_close(layer.dequantize().double(), deq, rtol=1e-6, atol=1e-7)
    got = layer.dequantize()
    assert torch.all(got.view(-1)[64:128] == 0)
    assert got.view(-1)[128] == pytest.approx(1.0, rel=1e-2) and got.view(-1)[129] == 0  # the tie went down


def test_int8_round_trip_equals_the_naive_reference():
    w = known_weight(48, 96, seed=1)
    layer = QuantLinear.from_weight(w, 8)
    assert layer.weight.dtype == torch.int8 and layer.absmax.shape == (48,)
    for r in range(48):
        row = [float(v) for v in w[r]]
        absmax = max(abs(v) for v in row)
        scale = np.float32(127.0) / np.float32(max(absmax, 1e-38))
        want = [int(np.round(np.float32(v) * scale)) for v in row]  # half to even, as torch.round
        assert layer.weight[r].tolist() == want, r
        assert layer.absmax[r].item() == pytest.approx(absmax, rel=1e-7)
        deq = torch.tensor([q * absmax / 127 for q in want], dtype=torch.float64)
        torch.testing.assert_close(layer.dequantize()[r].double(), deq, rtol=1e-6, atol=1e-8)


def test_forward_is_linear_with_dequantize_and_gradients_reach_the_input():
    w = torch.randn(48, 128)
    for bits in (4, 8):
        layer = QuantLinear.from_weight(w, bits)
        assert list(layer.parameters()) == []  # nothing of it trains
        x = torch.randn(3, 5, 128, requires_grad=True)
        ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(3, 5, 48)
        y, y_ref = layer(x), F.linear(ref, layer.dequantize())
        assert torch.equal(y, y_ref)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, ref.grad)
        assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert layer.dequantize().shape == (48, 128)
        x.grad = ref.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py runs it on a GPU: as F.linear does
            y, y_ref = layer(x), F.linear(ref, layer.dequantize())
            assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
            y.backward(g.bfloat16())
            y_ref.backward(g.bfloat16())
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad, ref.grad, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_half_precision_layer_outside_autocast_gives_gradients_in_its_precision(bits):
    """A bf16 or fp16 LaVIN-lite LLaMA without autocast (a GPU user's --precision bf16 model called
    directly): the backward pass multiplies by the weight in the gradient's precision, as F.linear's."""
    for dtype in (torch.bfloat16, torch.float16):
        layer = QuantLinear.from_weight(torch.randn(48, 128).to(dtype), bits)
        x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
        ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(3, 5, 48, dtype=dtype)
        layer(x).backward(g)
        F.linear(ref, layer.dequantize()).backward(g)
        assert x.grad.dtype == dtype and torch.equal(x.grad, ref.grad)


def test_training_keeps_the_codes_not_a_full_precision_weight():
    """What autograd holds for the backward pass: F.linear would keep the dequantized (out, in)
    weight of every layer until then, 16 bits per weight; a QuantLinear keeps its own buffers."""
    for bits in (4, 8):
        layer = QuantLinear.from_weight(torch.randn(64, 256), bits)
        saved = []

        def pack(t):
            saved.append(t)
            return t

        x = torch.randn(4, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        held = {n: t for n, t in layer.named_buffers()}
        assert saved and all(any(t is b for b in held.values()) for t in saved), [t.shape for t in saved]
        assert not any(t.is_floating_point() and t.shape == (64, 256) for t in saved)


def test_no_full_precision_copy_is_kept_between_calls():
    layer = QuantLinear.from_weight(torch.randn(64, 256), 4)
    layer(torch.randn(2, 256))
    held = {n: t.dtype for n, t in layer.named_buffers()}
    assert held == {"weight": torch.uint8, "absmax": torch.uint8, "nested_absmax": torch.float32,
                    "offset": torch.float32, "quant_map": torch.float32, "nested_quant_map": torch.float32}
    assert layer.weight.numel() == 64 * 256 // 2 and layer.absmax.numel() == 64 * 256 // 64
    assert set(layer.state_dict()) == {"weight", "absmax", "nested_absmax", "offset"}  # the code tables are constants


def test_bytes_of_the_7b_llama_are_exact():
    """From the config alone: the blocks' 7 linears at 4.127 bits a weight, the rest in bf16."""
    a = LLAMA_SIZES["7B"]
    per_layer = [4096 * 4096] * 4 + [4096 * 11008] * 3
    rest = 2 * (2 * 32000 * 4096 + 4096 * (2 * 32 + 1))  # embeddings, output head, norms

    def nf4(n):  # codes, absmax codes, nested scales, offset, the two code tables
        return n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * (16 + 256)

    assert llama_bytes(a, 16) == 2 * 32 * sum(per_layer) + rest
    rows = [4096] * 4 + [11008, 4096, 11008]  # wq wk wv wo w1 w2 w3: one fp32 absmax per output row
    assert llama_bytes(a, 8) == 32 * sum(n + 4 * r for n, r in zip(per_layer, rows)) + rest
    assert llama_bytes(a, 4) == 32 * sum(nf4(n) for n in per_layer) + rest
    assert llama_bytes(a, 4) <= 3.9e9  # the goal: LaVIN-7B's frozen LLaMA in at most 3.9 GB


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("layout", ["meta-2-shards", "hf"])
def test_load_llama_quantizes_as_the_weights_stream_in(tmp_path, tokenizer_path, layout):
    """The loaded codes are those of the whole fp16 weight, merged from its shards (or un-permuted
    from HF's layout), quantized from the file's own precision; the rest is in the asked dtype."""
    from model import Tokenizer

    args = tiny_args(vocab_size=Tokenizer(tokenizer_path).n_words)
    state = {k: v.half() for k, v in random_state(args).items()}
    if layout == "hf":
        write_hf(tmp_path, args, state)
    else:
        write_meta(tmp_path, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=args.vocab_size,
                                  multiple_of=32, norm_eps=1e-5), state, n_shards=2)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    for bits in (4, 8):
        model, _ = load_llama(tmp_path, dtype=torch.bfloat16, bits=bits)
        for name in quant.LINEARS:
            part = "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward"
            layer = getattr(getattr(model.layers[1], part), name)
            want = QuantLinear.from_weight(state[f"layers.1.{part}.{name}.weight"], bits)
            assert isinstance(layer, QuantLinear) and layer.bits == bits and layer.dtype == torch.bfloat16
            assert torch.equal(layer.weight, want.weight) and torch.equal(layer.dequantize(), want.dequantize(torch.bfloat16))
        assert model.tok_embeddings.weight.dtype == torch.bfloat16
        assert torch.equal(model.tok_embeddings.weight, state["tok_embeddings.weight"].bfloat16())
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert quant.bits_of(model) == bits and not isinstance(model.output, QuantLinear)


def test_bad_bits():
    with pytest.raises(ValueError, match="4 or 8"):
        QuantLinear(64, 64, bits=3)
    with pytest.raises(ValueError, match="16, 8 or 4"):
        quant.quantize_(Llama(tiny_args(vocab_size=50)).layers, 3)


# ----------------------------------------------------------------------------- LaVIN-lite

def test_only_adapters_train_and_get_gradients_at_4_bits_with_checkpointing():
    tokens, images, ind, labels = batch()
    grads = []
    for ckpt in (False, True):
        model = lite(4, adapter_dropout=0.0).train()
        model.llama.grad_checkpointing = ckpt
        frozen = [p for n, p in model.llama.layers.named_parameters() if "adapter" not in n]
        assert all(not p.requires_grad for p in frozen)  # norms: the only parameters besides adapters
        assert all(not list(m.parameters()) for m in model.modules() if isinstance(m, QuantLinear))
        model(tokens, images, ind, labels).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(v.abs().sum() > 0 for n, v in g.items() if "llama.layers" in n and "conv_A" in n)
        grads.append(g)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_lavin_at_4_and_8_bits_stays_near_16_bits_on_the_shapes_backbones():
    """The shipped tiny LLaMA (0.6M parameters, dim 96): measured, relative L2 error of the logits
    0.65% at 8 bits, 9.0% at 4 bits (the greedy token agrees at 96% of positions). NF4's blocks of
    64 span parts of rows 96 wide, and four layers of error add up in a model this small."""
    out = {}
    for bits in (16, 8, 4):
        torch.manual_seed(0)
        m, tok = load_lavin(f"{BACKBONES}/llama", f"{BACKBONES}/clip/ViT-tiny.pt", LaVINArgs(), bits=bits,
                            max_seq_len=128)
        ids = torch.tensor([tok.encode("Question: Which color is the square?\nOptions: (A) red (B) blue\n"
                                       "Answer: The answer is", bos=True, eos=False)] * 2)
        r = m.visual.resolution
        img = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
        with torch.no_grad():
            out[bits] = m.eval()(ids, img, torch.tensor([1, 0]))  # an image sample and a text-only one
    rel = {b: ((out[b] - out[16]).norm() / out[16].norm()).item() for b in (8, 4)}
    assert rel[8] < 0.013 and rel[4] < 0.15, rel
    assert rel[8] < rel[4] / 5
    assert (out[4].argmax(-1) == out[16].argmax(-1)).float().mean() > 0.9


def test_the_summary_counts_quantized_weights_as_frozen_parameters():
    from lavin import summary

    assert summary(lite(4)) == summary(lite(8)) == summary(tiny_lavin(seed=0))


def test_a_quantized_model_refuses_to_fold():
    with pytest.raises(ValueError, match="quantized to 4 bits"):
        lite(4).fold(1)


def test_lite_checkpoint_round_trip_and_the_16_bit_warning(tmp_path):
    model = lite(4)
    save_adapters(tmp_path / "adapters.pth", model)
    assert torch.load(tmp_path / "adapters.pth", weights_only=True)["bits"] == 4
    other = lite(4, randomize_adapters=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same bits: nothing to say
        load_adapters(other, tmp_path / "adapters.pth")
    tokens, images, ind, _ = batch()
    with torch.no_grad():
        assert torch.equal(other(tokens, images, ind), model(tokens, images, ind))
    with pytest.warns(UserWarning, match="trained against a 4-bit"):
        load_adapters(tiny_lavin(seed=1), tmp_path / "adapters.pth")


def test_an_official_lite_checkpoint_at_16_bits_warns(tmp_path):
    ns = argparse.Namespace(adapter_dim=8, temperature=10.0, hidden_proj=128, adapter_type="attn",
                            visual_adapter_type="router", adapter_scale=1.0, bits="4bit")
    model = tiny_lavin(seed=0)
    torch.save(official_checkpoint(model, args=ns), tmp_path / "checkpoint-19.pth")
    with pytest.warns(UserWarning, match=r"4-bit \(NF4\) LLaMA \(LaVIN-lite\).*--bits 4"):
        load_adapters(model, tmp_path / "checkpoint-19.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters(lite(4), tmp_path / "checkpoint-19.pth")  # met with the backbone it was trained on
    torch.save(official_checkpoint(model, args=argparse.Namespace(**{**vars(ns), "bits": "8bit"})), tmp_path / "c8.pth")
    with pytest.warns(UserWarning, match=r"LLM.int8\(\) LLaMA \(the official --bits 8bit\)"):
        load_adapters(lite(8), tmp_path / "c8.pth")  # our int8 is weight-only: not the same backbone


# ----------------------------------------------------------------------------- compiled

@pytest.mark.parametrize("bits", [4, 8])
def test_a_compiled_lite_block_saves_no_dequantized_weight_for_the_backward(bits):
    """What a compiled block's forward graph hands its backward, as inductor partitions it (the
    min-cut partitioner; no kernels are generated here): the codes, never a 16-bit weight. Traced
    as QuantMatmul, the two dequantizations merged and the weight was saved, in every layer of
    every block, gradient checkpointing or not (LaVIN-7B-lite on a GPU: +11.6 GiB)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

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

    torch._dynamo.reset()  # the decode steps earlier tests compiled count toward dynamo's recompile limit
    model = lite(bits).eval()
    tokens, images, ind, _ = batch()
    prompts = [row.tolist() for row in tokens]
    tok = types.SimpleNamespace(eos_id=-1, stop_ids=set(), bos_id=1, decode=lambda ids: "")  # no EOS: every step compared
    want = generate(model, tok, prompts, images, ind, max_new_tokens=12)
    assert generate(model, tok, prompts, images, ind, max_new_tokens=12, decoder=StaticDecoder(model.llama)) == want


def test_agrees_with_bitsandbytes():
    """Outside the requirements: `pip install bitsandbytes` to run it (checked with 0.50.2). NF4
    codes, the offset and the nested scales equal bitsandbytes' quantize_4bit (compress_statistics=
    True). Its CPU library picks the 8-bit absmax codes with a binned search that is coarse near
    zero; where it differs from the nearest code (at most 0.5% of the absmaxes), ours is the nearer
    one, and the dequantized weight differs in those blocks only. Elsewhere it is bit for bit the
    weight rebuilt from bitsandbytes' own codes and scales (NF4 value x its dequantize_blockwise of
    the absmax codes), and its dequantize_4bit where the rows hold whole blocks of 64, as every
    LLaMA linear does: its CPU kernel reads the scales row by row, so for rows of 96 the blocks
    that straddle two rows get another block's scale."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    code = quant.dynamic_code()
    for seed, shape, dtype in [(0, (128, 256), torch.float32), (1, (96, 96), torch.float32),
                               (2, (1024, 512), torch.float16), (3, (512, 256), torch.bfloat16)]:
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)).to(dtype)
        packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = QuantLinear.from_weight(w, 4)
        assert torch.equal(ours.weight, packed.flatten())
        assert torch.equal(ours.offset, state.offset) and torch.equal(ours.nested_absmax, state.state2.absmax)
        differ = (ours.absmax != state.absmax).nonzero().flatten()
        assert len(differ) <= 0.005 * len(ours.absmax) + 1
        _, absmax = quant.blockwise(w.flatten(), 64, ours.quant_map)
        x = quant.per_block(absmax - ours.offset, 1 / ours.nested_absmax, 256)
        for i in differ:
            assert abs(x[i] - code[ours.absmax[i].int()]) <= abs(x[i] - code[state.absmax[i].int()])
        same = ours.absmax == state.absmax  # the dequantized weights of those blocks: bit for bit
        codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).view(-1, 64).long()
        scale = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
        rebuilt = (state.code[codes] * scale[:, None]).to(dtype)  # (blocks, 64)
        assert ours.dequantize().dtype == dtype
        assert torch.equal(ours.dequantize().view(-1, 64)[same], rebuilt[same])
        if shape[1] % 64 == 0:
            theirs = bnb.dequantize_4bit(packed, state).view(-1, 64)
            assert theirs.dtype == dtype and torch.equal(ours.dequantize().view(-1, 64)[same], theirs[same])
