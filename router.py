"""The modality token and the router of LaVIN's mixture-of-modality adapters (paper, section 3.2).

    image / text-only ──Embedding(2, dim)──> modality token m (position 0, seen by nothing else)
    a hidden state t ──Router──> w = softmax(Linear(dim, 2)(t) / temperature)   (2 paths)

In LLaMA, t is the normed hidden state of the modality token in each block, so every sample
takes one routing per block, decided by whether it shows an image; in CLIP each visual token is
routed on its own hidden state. The router is a pure function of its input: the caller computes
the weights (once per sequence, at prefill when generating) and passes them to the adapters.
"""
import torch
import torch.nn as nn

IMAGE, TEXT = 1, 0  # rows of the modality embedding (the official img_indicator: 1 = has image)


def modality_embedding(dim: int) -> nn.Embedding:
    """The learned modality tokens: row 1 for samples with an image, row 0 for text-only ones."""
    return nn.Embedding(2, dim)


class Router(nn.Linear):
    """softmax(Linear(dim, n_paths)(t) / temperature). A Linear, so its checkpoint keys are
    `expert_weights.{weight,bias}` as in the official adapters. A high temperature (10 for
    LaVIN-7B, 5 for 13B) keeps both paths in use early in training."""

    def __init__(self, dim: int, temperature: float, n_paths: int = 2):
        super().__init__(dim, n_paths)
        self.temperature = temperature

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        logits = super().forward(t)  # t in the router's dtype: MMAdapter.route casts it
        if logits.dtype not in (torch.float32, torch.float64):  # at least fp32 for the softmax: under
            logits = logits.float()  # autocast the logits come out in half precision
        return torch.softmax(logits / self.temperature, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
