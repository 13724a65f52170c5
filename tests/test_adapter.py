"""adapter.py: the grouped linear, the mixture-of-modality adapter against the paper's formula in
float64 (outputs and gradients), the einsum formula's bits, and the fold into a linear."""
import pytest
import torch
import torch.nn.functional as F

from adapter import GroupedLinear, MMAdapter, RepAdapter, fold_adapter


def test_grouped_linear_is_a_grouped_kernel_1_conv1d():
    lin = GroupedLinear(8, 64, groups=2)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, 5, 8)
    want = F.conv1d(x.transpose(1, 2), lin.weight[..., None], lin.bias, groups=2).transpose(1, 2)
    assert torch.allclose(lin(x), want, atol=1e-5)


def test_mm_adapter_against_float64_formula():
    ad = MMAdapter(16, hidden=4, groups=2, scale=0.7, temperature=5.0).eval()
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    sd = {k: v.double() for k, v in ad.state_dict().items()}
    logits = x @ sd["expert_weights.weight"].T + sd["expert_weights.bias"]
    w = torch.exp(logits / 5.0) / torch.exp(logits / 5.0).sum(-1, keepdim=True)  # per token
    h = x @ sd["conv_A.weight"].T + sd["conv_A.bias"]  # (2, 3, 4)
    up = []
    for name in ("conv_B", "conv_D"):  # group g: outputs 8g..8g+7 read hidden 2g..2g+1
        W = sd[f"{name}.weight"]
        out = torch.cat([h[..., 2 * g:2 * g + 2] @ W[8 * g:8 * g + 8].T for g in range(2)], -1)
        up.append(out + sd[f"{name}.bias"])
    want = x + 0.7 * (w[..., :1] * up[0] + w[..., 1:] * up[1])
    assert torch.allclose(ad.double()(x), want, rtol=0, atol=1e-10)


def test_zero_initialised_adapter_is_the_identity():
    ad = MMAdapter(16)
    x = torch.randn(2, 3, 16)
    assert torch.equal(ad(x), x)


def test_fold_adapter_into_linear():
    ad = MMAdapter(16, hidden=4, scale=1.3).eval()
    for p in ad.parameters():
        torch.nn.init.normal_(p, std=0.5)
    lin = torch.nn.Linear(16, 24)
    w = torch.tensor([0.3, 0.7])
    W, b = fold_adapter(ad, w, lin.weight, lin.bias)
    x = torch.randn(5, 16)
    assert torch.allclose(x @ W.T + b, lin(ad(x, w.expand(5, 2))), atol=1e-4)


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
