"""What keeps the training step fast on a GPU, checked on the CPU: how many ops one step
dispatches (on a GPU each is a kernel launch, and launches dominated the eager 7B step), the
lighter adapters against the paper's formulas in float64, and gradient checkpointing inside a
compiled block (the compiler recomputes the block itself)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from adapter import MMAdapter, RepAdapter
from clip import ResidualAttentionBlock, VisionTransformer
from config import TrainConfig
from lavin import LaVIN, LaVINArgs
from model import Block, Llama, ModelArgs, rope_angles
from runtime import UsageError, use_compile

OFFICIAL_OPS = 3548  # the official LaVIN code's training step at the config below, counted the same way


class CountOps(TorchDispatchMode):
    """Every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_dispatches_no_more_ops_than_the_official_one():
    """One eager fp32 step of train.py (forward, loss, backward, AdamW, zero_grad) of LaVIN at a
    mid-size config: LLaMA dim 512 x 4 layers, vocab 3,000; CLIP width 1024 x 8 blocks at 28 px,
    patch 14; batch 4 (two with an image) x 128 tokens; AdamW fused, as train.py makes it on a GPU,
    where each op is a kernel launch. The official code dispatches 3,548 ops for it; ours did
    4,296 before the adapters lost einsum's views and copies and the modality token its rotation.
    (On the CPU train.py takes foreach AdamW, bit for bit the plain loop's update, which reads each
    parameter's step count back: 217 ops more. The plain loop it replaced: 5,252 in all before.)
    Counted with torch 2.13, the one CI installs: another release may decompose ops otherwise."""
    torch.manual_seed(0)
    llama = Llama(ModelArgs(dim=512, n_layers=4, n_heads=8, vocab_size=3000, multiple_of=256))
    visual = VisionTransformer(resolution=28, patch_size=14, width=1024, layers=8, output_dim=512)
    model = LaVIN(LaVINArgs(), llama, visual, [7, 8, 9], [7, 8, 10, 11]).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 3000, (4, 128), generator=g)
    tokens[:, 0] = 1  # BOS
    labels = tokens.masked_fill(torch.arange(128) < 64, -100)  # the second half is the answer
    batch = {"tokens": tokens, "labels": labels, "images": torch.randn(4, 3, 28, 28, generator=g),
             "img_indicator": torch.tensor([1, 1, 0, 0])}
    opt = train.make_optimizer(model, TrainConfig(), 1e-3, fused=True)
    no_autocast = torch.autocast("cpu", enabled=False)
    train.train_step(model, [batch], opt, None, no_autocast, torch.device("cpu"), 1)  # AdamW's state made
    with CountOps() as count:
        train.train_step(model, [batch], opt, None, no_autocast, torch.device("cpu"), 1)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran
    assert count.ops["aten._fused_adamw_"] == 2  # one per parameter group: AdamW ran, fused
    n = sum(count.ops.values())
    assert n <= OFFICIAL_OPS, f"{n} ops; the most common: {count.ops.most_common(8)}"


# ----------------------------------------------------------------------------- the adapters

def grouped(h, W, b, groups):
    """A Conv1d of kernel 1 with `groups` groups, as naive loops: output o of group g reads the
    inputs of group g only."""
    out = torch.empty(*h.shape[:-1], W.shape[0], dtype=h.dtype)
    n_out, n_in = W.shape[0] // groups, h.shape[-1] // groups
    for o in range(W.shape[0]):
        g = o // n_out
        out[..., o] = (h[..., g * n_in:(g + 1) * n_in] * W[o]).sum(-1) + b[o]
    return out


@pytest.mark.parametrize("routing", ["per sample", "per token", "one path"])
def test_adapter_outputs_and_gradients_are_the_papers_formula_in_float64(routing):
    """x + s * (w0 * conv_B(h) + w1 * conv_D(h)), h = conv_A(x), w from the modality token (LLaMA) or
    from each token (CLIP); x + s * conv_B(h) without a router. Both the output and the gradient of
    every parameter and of x, against the formula written out here."""
    torch.manual_seed(0)
    dim, hidden, scale = 12, 4, 0.7
    ad = (RepAdapter if routing == "one path" else MMAdapter)(dim, hidden, groups=2, scale=scale, dropout=0.0)
    ad = ad.double()
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, dim, dtype=torch.float64, requires_grad=True)
    w_in = torch.softmax(torch.randn(2, 1, 2, dtype=torch.float64), -1).requires_grad_(routing == "per sample")
    got = ad(x, w_in if routing == "per sample" else None)
    got.pow(2).sum().backward()
    params = dict(ad.named_parameters())
    got_grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    got_grads["x"], got_grads["w"] = x.grad, w_in.grad

    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    xr = x.detach().clone().requires_grad_()
    w_ref = w_in.detach().clone().requires_grad_(w_in.requires_grad)
    h = xr @ leaves["conv_A.weight"].T + leaves["conv_A.bias"]
    up_B = grouped(h, leaves["conv_B.weight"], leaves["conv_B.bias"], 2)
    if routing == "one path":
        want = xr + scale * up_B
    else:
        if routing == "per sample":
            w = w_ref
        else:
            logits = xr @ leaves["expert_weights.weight"].T + leaves["expert_weights.bias"]
            w = torch.exp(logits / 10.0) / torch.exp(logits / 10.0).sum(-1, keepdim=True)
        up_D = grouped(h, leaves["conv_D.weight"], leaves["conv_D.bias"], 2)
        want = xr + scale * (w[..., :1] * up_B + w[..., 1:] * up_D)
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    want_grads = {n: t.grad for n, t in leaves.items() if t.grad is not None}
    want_grads["x"], want_grads["w"] = xr.grad, w_ref.grad
    assert set(got_grads) == set(want_grads)
    for n in want_grads:
        if want_grads[n] is None:  # w: a constant unless routed per sample
            assert got_grads[n] is None, n
        else:
            torch.testing.assert_close(got_grads[n], want_grads[n], rtol=0, atol=1e-9, msg=n)


@pytest.mark.parametrize("routing", ["per sample", "per token", "one path"])
def test_adapter_gives_the_einsum_formulas_bits_forward_and_backward(routing):
    """The adapter's batched matmul is the kernel GroupedLinear's einsum ends in: in fp32 the
    output and every gradient are bit for bit the formula's, so a training run (the laptop demo's
    table) is the same as with the einsum adapters it replaced."""
    torch.manual_seed(0)
    ad = (RepAdapter if routing == "one path" else MMAdapter)(64, 8, groups=2, dropout=0.0).train()
    for p in ad.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 17, 64, requires_grad=True)
    w = torch.softmax(torch.randn(3, 1, 2), -1).requires_grad_()

    def einsum(h, lin):  # a grouped kernel-1 Conv1d by einsum, the adapters' former forward
        w = lin.weight.unflatten(0, (lin.groups, -1))  # (g, out/g, in/g)
        return torch.einsum("...gi,goi->...go", h.unflatten(-1, (lin.groups, -1)), w).flatten(-2) + lin.bias

    def formula():  # the einsum adapter's forward, in its order (autograd sums x's gradients in it)
        ww = w if routing != "per token" else ad.expert_weights(x)
        h = ad.conv_A(x)
        if routing == "one path":
            return x + einsum(h, ad.conv_B)
        return x + (einsum(h, ad.conv_B) * ww[..., :1] + einsum(h, ad.conv_D) * ww[..., 1:])

    results = []
    for fn in (lambda: ad(x, w if routing == "per sample" else None), formula):
        for t in [x, w, *ad.parameters()]:
            t.grad = None
        y = fn()
        y.pow(2).sum().backward()
        results.append([y.detach(), x.grad, w.grad] + [p.grad for p in ad.parameters()])
    for got, want in zip(*results):
        assert (got is None and want is None) or torch.equal(got, want)


# ----------------------------------------------------------------------------- compiled checkpointing

def saved_bytes(module, call):
    """Bytes autograd saves for the backward pass while call() runs, leaving out the module's own
    parameters (held anyway): the activations a block keeps."""
    own = {p.data_ptr() for p in module.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    return out, sum(saved)


def llama_block():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32)
    block = Block(args)
    block.adapter_attn = MMAdapter(64, dropout=0.0)
    routes = (torch.softmax(torch.randn(2, 1, 2), -1), None)

    def run(x, recompute):
        rope = rope_angles(torch.arange(x.shape[1]) + 1, args.head_dim, args.rope_theta)
        return block(x, rope, routes=routes, recompute=recompute)[0]

    return block, run, (2, 48, 64)


def clip_block():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 1)
    block.adapter_attn = MMAdapter(64, dropout=0.0)
    return block, lambda x, recompute: block(x, recompute), (2, 48, 64)


@pytest.mark.parametrize("make", [llama_block, clip_block], ids=["llama", "clip"])
def test_a_compiled_block_recomputes_itself_and_gives_the_eager_gradients(make):
    """--compile --grad_checkpointing: torch.compile sees the checkpoint inside the block, so the
    compiled block keeps little more than its input for the backward pass (not its activations)
    and its gradients are the eager block's, fp32. Whole: no graph break, at a second and a third
    sequence length too (a training run's batches differ in length: the compiler then makes the
    length symbolic, and a graph break would leave the checkpoint to eager code again)."""
    from torch._dynamo.utils import counters

    counters.clear()
    block, run, shape = make()
    for name, p in block.named_parameters():  # frozen backbone, trainable adapter, live up-projections
        p.requires_grad_(name.startswith("adapter_attn."))
        if name.startswith("adapter_attn."):
            torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randn(shape)
    results = []
    for compiled, recompute in ((False, False), (True, True)):
        if compiled:
            block.compile()
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y, kept = saved_bytes(block, lambda: run(x, recompute))
        y.pow(2).sum().backward()
        grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, grads, kept))
    (y_e, gx_e, g_e, kept_eager), (y_c, gx_c, g_c, kept_compiled) = results
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    assert set(g_c) == set(g_e) and g_e
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-4, atol=1e-5, msg=n)
    # the eager block keeps ~15 activations of the input's size or larger; recomputing, ~2
    assert kept_compiled < 0.3 * kept_eager, (kept_compiled, kept_eager)
    for length in (40, 44):
        run(torch.randn(shape[0], length, shape[2], requires_grad=True), True).sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])


# ----------------------------------------------------------------------------- the default

def test_compile_is_the_default_on_a_gpu_only(monkeypatch):
    import importlib.util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile(False, False, cpu) == (False, "")  # the laptop demo stays eager
    assert use_compile(True, False, cpu) == (True, "")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    assert use_compile(False, False, cuda) == (True, "")
    assert use_compile(False, True, cuda) == (False, "")
    with pytest.raises(UsageError, match="contradict"):
        use_compile(True, True, cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    compiled, note = use_compile(False, False, cuda)  # no triton: eager, and the user is told why
    assert not compiled and "triton" in note
    with pytest.raises(UsageError, match="needs triton"):
        use_compile(True, False, cuda)


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
