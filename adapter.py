"""LaVIN's mixture-of-modality adapter (paper, section 3.2), and what surrounds it: which
parameters train, folding an adapter into the layer that reads it, and the official checkpoints.

A RepAdapter (Luo et al. 2023, "Towards Efficient Visual Adaption via Structural
Re-parameterization") is a bottleneck with a residual, placed before attention:

    x ──┬──────────────────────────────────────────────┐
        └─ conv_A (dim -> 8) ─ dropout ─ conv_B (8 -> dim, 2 groups) ─ * s ─ + ──> to attention

The mixture-of-modality adapter keeps the shared down-projection and has two up-projections,
one per reasoning path, mixed by router weights (router.py):

    x + s * (w0 * conv_B(h) + w1 * conv_D(h)),   h = dropout(conv_A(x)),   w = router(token)

Names follow the official checkpoints (conv_A/B/D were Conv1d with kernel 1 there: a Linear).
For fixed router weights the adapter is an affine map, so at inference it can be folded into the
linear layers that read its output (`fold_adapter`), leaving the backbone's cost unchanged.
"""
import torch
import torch.nn as nn

from model import check_state
from router import Router


def adapter_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as an adapter or its router reads it. Under autocast x stays as it is (autocast gives each
    matmul its dtype, so a cast here would be a wasted kernel each call); outside it, a
    half-precision backbone meets the fp32 adapters, which then compute in fp32."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """x (..., in) times the block-diagonal matrix whose diagonal blocks are weight (out, in/groups)'s
    `groups` slices: (..., out). One matmul per group, all in one batched matmul: the kernel an
    einsum would end in, without the dozen view and copy ops it adds around it each way (on a GPU
    each op is a kernel launch, and launches dominated the eager step)."""
    n_in = x.shape[-1] // groups
    xg = x.reshape(-1, groups, n_in).transpose(0, 1)  # (g, N, in/g)
    w = weight.view(groups, -1, n_in).transpose(1, 2)  # (g, in/g, out/g)
    return torch.bmm(xg, w).transpose(0, 1).reshape(*x.shape[:-1], -1)  # (g, N, out/g) -> (..., out)


class GroupedLinear(nn.Module):
    """A Conv1d with kernel 1 and `groups` groups: block-diagonal, each output group reads one
    input group. weight (out, in/groups) is the official Conv1d weight without its kernel dim."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"{in_features} -> {out_features} does not split into {groups} groups")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x):
        y = grouped_matmul(x, self.weight, self.groups)  # (..., out)
        return y + self.bias.to(y.dtype)  # under autocast y is half precision: keep it so

    def dense(self) -> torch.Tensor:
        """The (out, in) block-diagonal matrix this layer multiplies by."""
        return torch.block_diag(*self.weight.unflatten(0, (self.groups, -1)))


class RepAdapter(nn.Module):
    """The single-path bottleneck: x + s * conv_B(dropout(conv_A(x)))."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1):
        super().__init__()
        self.scale = scale
        self.conv_A = nn.Linear(dim, hidden)
        self.conv_B = GroupedLinear(hidden, dim, groups)
        self.dropout = nn.Dropout(dropout)
        # Xavier down, zero up: a new adapter is the identity, the frozen model is untouched.
        nn.init.xavier_uniform_(self.conv_A.weight)
        nn.init.zeros_(self.conv_A.bias)
        nn.init.zeros_(self.conv_B.weight)
        nn.init.zeros_(self.conv_B.bias)

    def paths(self) -> list:
        """The up-projections, one per reasoning path."""
        return [self.conv_B]

    def forward(self, x, weights=None):
        """x (B, L, dim); weights: unused, one path serves every modality (the ablation of LaVIN
        without a router, train.py --no_router)."""
        xa = adapter_input(x, self.conv_A.weight)
        h = self.dropout(self.conv_A(xa))  # (B, L, hidden)
        return (xa + self.scale * self.conv_B(h)).to(x.dtype)

    def up(self, weights=None):
        """The up-projection as a dense (dim, hidden) matrix and its bias, in float64."""
        return self.conv_B.dense().double(), self.conv_B.bias.double()

    @torch.no_grad()
    def affine(self, weights=None):
        """(M, c) with adapter(x) = x @ M.T + c (eval mode, routing weights fixed), in float64."""
        A, a = self.conv_A.weight.double(), self.conv_A.bias.double()
        up, up_bias = self.up(weights)  # (dim, hidden), (dim,)
        M = torch.eye(A.shape[1], dtype=torch.float64, device=A.device) + self.scale * up @ A
        return M, self.scale * (up @ a + up_bias)


class MMAdapter(RepAdapter):
    """The mixture-of-modality adapter: RepAdapter with a second up-projection and a router."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0,
                 dropout: float = 0.1, temperature: float = 10.0):
        super().__init__(dim, hidden, groups, scale, dropout)
        self.conv_D = GroupedLinear(hidden, dim, groups)
        nn.init.zeros_(self.conv_D.weight)
        nn.init.zeros_(self.conv_D.bias)
        self.expert_weights = Router(dim, temperature)

    def paths(self) -> list:
        return [self.conv_B, self.conv_D]

    def route(self, x) -> torch.Tensor:
        """Router weights (..., 2) read off x (..., dim) itself."""
        return self.expert_weights(adapter_input(x, self.conv_A.weight))

    def forward(self, x, weights=None):
        """x (B, L, dim); weights (B, 1, 2) from the modality token, or (B, L, 2), or None to route
        each token on its own hidden state (as in CLIP). The paper's formula (section 3.2)."""
        xa = adapter_input(x, self.conv_A.weight)
        w = self.route(xa) if weights is None else weights  # (B, 1 or L, 2)
        h = self.dropout(self.conv_A(xa))  # (B, L, hidden)
        w0, w1 = w.to(h.dtype).split(1, -1)  # (B, 1 or L, 1) each
        return (xa + self.scale * (w0 * self.conv_B(h) + w1 * self.conv_D(h))).to(x.dtype)

    def up(self, weights):
        """Both up-projections mixed by routing weights (2,): (dim, hidden) and (dim,), float64."""
        w0, w1 = weights.double().flatten().tolist()
        return (w0 * self.conv_B.dense().double() + w1 * self.conv_D.dense().double(),
                w0 * self.conv_B.bias.double() + w1 * self.conv_D.bias.double())


@torch.no_grad()
def fold_adapter(adapter: RepAdapter, weights, weight: torch.Tensor, bias=None):
    """Fold an adapter with fixed routing weights into a linear layer y = x @ W.T + b reading its
    output: y = adapter(x) @ W.T + b = x @ (W M).T + (W c + b). Returns the new (W, b)."""
    M, c = adapter.affine(weights)
    W = weight.double()
    new_bias = W @ c + (0 if bias is None else bias.double())
    return (W @ M).to(weight.dtype), new_bias.to(weight.dtype)


# ----------------------------------------------------------------------------- what trains

def is_trainable(name: str) -> bool:
    """Adapters, routers, the visual neck and the modality embedding: every name with 'adapter',
    the rule the official code uses, which our names keep."""
    return "adapter" in name


def mark_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything but the adapter side."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
    return model


def trainable_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if is_trainable(k)}


# ----------------------------------------------------------------------------- official checkpoints

OFFICIAL_PREFIXES = [  # official name prefix -> ours
    ("layers.", "llama.layers."),
    ("backbone.visual.", "visual."),
    ("adapter_proj.", "adapter_proj."),
    ("adapter_modality_embedding.", "adapter_modality_embedding."),
]


def convert_official(state: dict) -> dict:
    """Official LaVIN adapter weights (`checkpoint-19.pth`'s "model") under our names: the DDP
    `module.` prefix dropped, LLaMA blocks under `llama.`, CLIP under `visual.`, and Conv1d
    kernels (out, in/groups, 1) squeezed to Linear weights."""
    out = {}
    for key, t in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for old, new in OFFICIAL_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            raise KeyError(f"{key}: not an adapter-side weight of the official LaVIN checkpoint")
        if t.dim() == 3 and t.shape[-1] == 1:
            t = t.squeeze(-1)
        out[name] = t
    return out


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict, source: str = "checkpoint"):
    """Copy adapter-side weights into model after checking every key and shape first, so a
    checkpoint for another model size or adapter dim changes nothing."""
    check_state(trainable_state_dict(model), state, source)
    params = dict(model.named_parameters())
    for key, t in state.items():
        params[key].copy_(t)
