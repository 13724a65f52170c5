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
from router import Router, adapter_input


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
        """The layer on its own, by einsum: the reference. The adapters run each path as one
        batched matmul (RepAdapter.up_paths), which a test holds to this one's bits."""
        xg = x.unflatten(-1, (self.groups, -1))  # (..., g, in/g)
        w = self.weight.unflatten(0, (self.groups, -1))  # (g, out/g, in/g)
        y = torch.einsum("...gi,goi->...go", xg, w.to(xg.dtype))  # (..., g, out/g)
        return y.flatten(-2) + self.bias.to(y.dtype)

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

    def up_paths(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Every path's up-projection of h (B, L, hidden), bias added: one (B, L, dim) each. A
        grouped layer is a matmul per group, so one batched matmul over the groups does it: the
        kernel GroupedLinear's einsum ends in, without the dozen view and copy ops einsum adds
        around it each way (on a GPU each op is a kernel launch, and launches dominated the eager
        step). The same kernel in the same order: the same bits as the einsum, gradients too.
        (One matmul for both paths would save a few more ops, but sums the two paths' gradients
        inside it, in another order: other bits, another laptop table.)"""
        g, hidden = self.conv_B.groups, h.shape[-1]
        hg = h.reshape(-1, g, hidden // g).transpose(0, 1)  # (g, B*L, hidden/g)
        out = []
        for up in self.paths():
            w = up.weight.view(g, -1, hidden // g).transpose(1, 2)  # (g, hidden/g, dim/g)
            y = torch.bmm(hg, w).transpose(0, 1).reshape(*h.shape[:-1], -1)  # (g, B*L, dim/g) -> (B, L, dim)
            out.append(y + up.bias.to(y.dtype))  # under autocast y is half precision: keep it so
        return out

    def scaled(self, y):
        return y if self.scale == 1 else self.scale * y  # s = 1 in the paper: no kernel spent on it

    def forward(self, x, weights=None):
        """x (B, L, dim); weights: unused, one path serves every modality (the ablation of LaVIN
        without a router, train.py --no_router)."""
        xa = adapter_input(x, self.conv_A.weight)
        up, = self.up_paths(self.dropout(self.conv_A(xa)))  # (B, L, dim)
        return (xa + self.scaled(up)).to(x.dtype)

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

    def forward(self, x, weights=None):
        """x (B, L, dim); weights (B, 1, 2) from the modality token, or (B, L, 2), or None to
        route each token on its own hidden state (as in CLIP)."""
        xa = adapter_input(x, self.conv_A.weight)
        if weights is None:
            weights = self.expert_weights(xa)
        up_B, up_D = self.up_paths(self.dropout(self.conv_A(xa)))  # each (B, L, dim)
        w = weights.to(up_B.dtype)
        return (xa + self.scaled(up_B * w[..., :1] + up_D * w[..., 1:])).to(x.dtype)

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
