"""LaVIN-lite's frozen LLaMA in 4 or 8 bits: weight-only quantized linear layers in plain PyTorch.

The official LaVIN-lite (`--bits 4bit`) replaces every linear layer of the LLaMA blocks with
bitsandbytes' Linear4bit: 4-bit NormalFloat (NF4, QLoRA: Dettmers et al. 2023, sec. 3) with
double quantization. Only the adapters train; they stay fp32 and see the weights as the 16-bit
model would, up to the quantization error. Here the same format, written out:

    W (out, in) ─ flattened row-major ─ blocks of 64 ─┬─ absmax of each block (fp32)
                                                       │    └─ double quantization: absmax - their mean,
                                                       │       blocks of 256, 8-bit dynamic code + one fp32 each
                                                       └─ W * (1 / absmax) in [-1, 1] ─ nearest of the 16 NF4
                                                          values ─ 4-bit code, two per byte (first: high nibble)

    buffer         dtype   shape                 bits per weight
    weight         uint8   (out * in / 2,)       4         two NF4 codes per byte
    absmax         uint8   (out * in / 64,)      0.125     each block's absmax less `offset`, 8-bit code
    nested_absmax  fp32    (out * in / 16384,)   0.002     one scale per 256 absmaxes
    offset         fp32    ()                              the mean absmax
    W = NF4[code] * (DYNAMIC[absmax] * nested_absmax + offset), in fp32, then the compute dtype

8 bits: int8 codes round(W * 127 / absmax) with one fp32 absmax per output row (weight-only int8).

The forward dequantizes the weight on every call, and the backward pass again (QuantMatmul): no
full-precision copy outlives a call, in training either. Under torch.compile the same holds by two
other routes (QuantLinear.forward): training marks the dequantization for recomputation (selective
checkpointing), and a decode step's few rows take fused_matvec, sums over the codes that the
compiler fuses into the reduction, so that decoding reads 4 bits a weight, not 16. Codes are chosen as
bitsandbytes chooses them (scale by the reciprocal absmax in fp32, the nearest code value, a tie
to the lower one), so an adapter checkpoint of the official lite meets the backbone it was trained
against. This file imports no other of the project: model.py's loader quantizes with it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# QLoRA's NormalFloat: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (appendix E).
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
BLOCK, NESTED_BLOCK = 64, 256  # weights per absmax; absmaxes per nested scale (bitsandbytes' defaults)
FUSED_ROWS = 4  # compiled, without gradients, at most this many rows (decoding) take fused_matvec
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # what the official lite quantizes: every linear of a block


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code, which double quantization uses for the absmaxes:
    for each decade 10^-6 .. 10^0, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times it, and
    their negatives; then 0 and 1. 256 values, sorted, made in fp32 as bitsandbytes makes them."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def blockwise(x: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) in blocks of `block` -> (the nearest code's index of each value (n,) uint8, each
    block's absmax (blocks,) fp32). A tie between two code values goes to the lower."""
    n = x.numel()
    blocks = x.float()
    if n % block:
        blocks = F.pad(blocks, (0, -n % block))  # zeros change no absmax
    blocks = blocks.view(-1, block)  # (blocks, block)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).flatten()[:n]
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8), absmax


def per_block(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """values (n,) with each block of `block` multiplied by its scale (blocks,)."""
    n = values.numel()
    if n % block:
        values = F.pad(values, (0, -n % block))
    return (values.view(-1, block) * scales[:, None]).flatten()[:n]  # (blocks, block) -> (n,)


def block_scales(absmax, nested_absmax, offset, nested_quant_map) -> torch.Tensor:
    """Each NF4 block's scale (n/64,): its 8-bit absmax code, dequantized by double quantization."""
    return per_block(nested_quant_map[absmax.int()], nested_absmax, NESTED_BLOCK) + offset


def dequantize(shape, dtype, weight, absmax, nested_absmax=None, offset=None, quant_map=None, nested_quant_map=None):
    """The (out, in) weight in dtype from a QuantLinear's buffers: int8 codes and row absmaxes, or
    NF4 (the last four given). Computed in fp32, as bitsandbytes does, then cast."""
    if quant_map is None:
        w = weight.float() * (absmax / 127.0)[:, None]
    else:
        scales = block_scales(absmax, nested_absmax, offset, nested_quant_map)  # (n/64,)
        codes = torch.stack((weight >> 4, weight & 15), -1).flatten()  # (n/2, 2) -> (n,): high nibble first
        w = per_block(quant_map[codes.int()], scales, BLOCK)
    return w.view(shape).to(dtype)


def dequantized_linear(x, shape, dtype, *buffers):
    """x W^T with W dequantized in dtype: QuantMatmul's forward, and the compiled paths' plain ops."""
    return F.linear(x, dequantize(shape, dtype, *buffers))


class QuantMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized again in the backward pass. F.linear would keep its W, a 16-bit
    copy of every layer's weight, for the input's gradient until the backward pass; this keeps the
    layer's codes, as bitsandbytes' MatMul4Bit does."""

    @staticmethod
    def forward(ctx, x, shape, dtype, *buffers):
        ctx.shape = shape
        ctx.save_for_backward(*buffers)
        return dequantized_linear(x, shape, dtype, *buffers)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # read once: gradient checkpointing allows one unpacking
        w = dequantize(ctx.shape, grad.dtype, *saved)  # (out, in)
        return grad @ w, None, None, *[None] * len(saved)  # (..., out) @ (out, in): (..., in)


def fused_matvec(x, shape, weight, absmax, nested_absmax=None, offset=None, quant_map=None, nested_quant_map=None):
    """x W^T for a few rows of x (decoding), in fp32, as sums the compiler fuses into one kernel
    that reads the codes: no (out, in) weight is written. Per output and block of 64 inputs, the
    sum of x * NF4[code], times the block's scale (int8: per output, x * code, times absmax/127).
    Eagerly it materializes those products: it is for torch.compile. NF4 needs in % 64 == 0."""
    out_f, in_f = shape
    x = x.float()
    if quant_map is None:
        return (x[..., None, :] * weight.float()).sum(-1) * (absmax / 127.0)  # (..., 1, in) * (out, in) -> (..., out)
    scales = block_scales(absmax, nested_absmax, offset, nested_quant_map)  # (out * in / 64,)
    packed = weight.view(out_f, in_f // BLOCK, BLOCK // 2)  # (out, in/64, 32): a byte, two codes, the first high
    pairs = x.view(*x.shape[:-1], 1, in_f // BLOCK, BLOCK // 2, 2)  # (..., 1, in/64, 32, 2)
    partial = (pairs[..., 0] * quant_map[(packed >> 4).int()] + pairs[..., 1] * quant_map[(packed & 15).int()]).sum(-1)
    return (partial * scales.view(out_f, in_f // BLOCK)).sum(-1)  # (..., out, in/64) -> (..., out)


# Saved, not recomputed: the matmul's output is what the next ops' backward needs, and the one
# costly op of the region; everything else (the dequantization) is cheap to redo from the codes.
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def recompute_all_but_matmuls():
    """Selective checkpointing's contexts: a matmul's output is saved, every other op recomputed."""
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class QuantLinear(nn.Module):
    """A frozen y = x W^T with W held in `bits` (4: NF4 with double quantization, 8: int8 per row)
    and dequantized on every call in `dtype`, the precision the 16-bit model would hold it in. It
    has buffers, no parameters: nothing of it trains, gradients flow through it to its input."""

    def __init__(self, in_features: int, out_features: int, bits: int, dtype=torch.float32, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"a quantized linear layer holds 4 or 8 bits, not {bits}")
        n = in_features * out_features
        if bits == 4 and n % 2:
            raise ValueError(f"a {out_features}x{in_features} weight has an odd count: NF4 packs two per byte")
        self.in_features, self.out_features, self.bits, self.dtype = in_features, out_features, bits, dtype
        empty = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        if bits == 8:
            self.register_buffer("weight", empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("absmax", empty(out_features, dtype=torch.float32))
            return
        blocks = -(-n // BLOCK)
        self.register_buffer("weight", empty(n // 2, dtype=torch.uint8))
        self.register_buffer("absmax", empty(blocks, dtype=torch.uint8))
        self.register_buffer("nested_absmax", empty(-(-blocks // NESTED_BLOCK), dtype=torch.float32))
        self.register_buffer("offset", empty(dtype=torch.float32))
        # The two code tables: constants of the format, not saved.
        self.register_buffer("quant_map", torch.tensor(NF4, device=device), persistent=False)
        self.register_buffer("nested_quant_map", dynamic_code().to(device), persistent=False)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> "QuantLinear":
        """Fill the codes and scales from a weight (out_features, in_features), on its device."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.out_features}x{self.in_features} layer")
        w = weight.detach().float()
        if self.bits == 8:
            absmax = w.abs().amax(1)  # (out,)
            self.weight = torch.round(w * (127.0 / absmax.clamp(min=1e-38))[:, None]).to(torch.int8)
            self.absmax = absmax
            return self
        self.quant_map, self.nested_quant_map = torch.tensor(NF4, device=w.device), dynamic_code().to(w.device)
        codes, absmax = blockwise(w.flatten(), BLOCK, self.quant_map)
        self.weight = codes[0::2] << 4 | codes[1::2]  # (n/2,): the first of each pair in the high nibble
        self.offset = absmax.mean()
        self.absmax, self.nested_absmax = blockwise(absmax - self.offset, NESTED_BLOCK, self.nested_quant_map)
        return self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, dtype=None) -> "QuantLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, dtype or weight.dtype, device=weight.device)
        return layer.quantize_(weight)

    def buffers_in_order(self) -> tuple:
        names = ("weight", "absmax") if self.bits == 8 else \
            ("weight", "absmax", "nested_absmax", "offset", "quant_map", "nested_quant_map")
        return tuple(getattr(self, name) for name in names)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight this layer multiplies by, (out_features, in_features), in dtype (default: its own)."""
        return dequantize((self.out_features, self.in_features), dtype or self.dtype, *self.buffers_in_order())

    def forward(self, x):
        shape, buffers = (self.out_features, self.in_features), self.buffers_in_order()
        if not torch.compiler.is_compiling():
            return QuantMatmul.apply(x, shape, self.dtype, *buffers)  # the reference
        if not torch.is_grad_enabled():
            if x.numel() <= FUSED_ROWS * self.in_features and (self.bits == 8 or self.in_features % BLOCK == 0):
                return fused_matvec(x, shape, *buffers).to(self.dtype)  # decoding: bound by the bytes read
            return dequantized_linear(x, shape, self.dtype, *buffers)
        # Traced, QuantMatmul's two dequantizations become one (the same inputs), whose output is
        # then kept for the backward: a 16-bit copy of every weight. As a region of selective
        # checkpointing, the dequantization is recomputed and only the matmul's output saved.
        return checkpoint(dequantized_linear, x, shape, self.dtype, *buffers, use_reentrant=False,
                          context_fn=recompute_all_but_matmuls)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, dtype={self.dtype}"


def quantize_(module: nn.Module, bits: int, dtype=None) -> nn.Module:
    """Replace the LLaMA linear layers inside `module` (LINEARS: a block's wq .. w3) with
    QuantLinears, in place: quantized from their weights, or empty ones to be filled by a loader
    when the weights are on the meta device. bits=16 changes nothing."""
    if bits not in (16, 8, 4):
        raise ValueError(f"bits must be 16, 8 or 4, not {bits}")
    if bits == 16:
        return module
    for parent in list(module.modules()):
        for name in LINEARS:
            child = parent._modules.get(name)
            if not isinstance(child, nn.Linear):
                continue
            if child.bias is not None:
                raise ValueError(f"{name} has a bias: LLaMA's linear layers have none")
            w = child.weight
            layer = QuantLinear(child.in_features, child.out_features, bits, dtype or w.dtype, device=w.device)
            setattr(parent, name, layer if w.is_meta else layer.quantize_(w))
    return module


def bits_of(module: nn.Module) -> int:
    """4 or 8 when module holds quantized layers, else 16."""
    return next((m.bits for m in module.modules() if isinstance(m, QuantLinear)), 16)


def held_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of module, meta tensors included (the exact size of a
    model built on the meta device in the dtype it would be loaded in)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
