"""router.py: the router's weights, and every router of a LaVIN at the model's temperature."""
import pytest
import torch

from router import IMAGE, TEXT, Router
from tests.helpers import tiny_lavin


def test_router_weights_sum_to_one_and_soften_with_temperature():
    r = Router(16, temperature=10.0)
    t = torch.randn(4, 16) * 5
    w = r(t)
    assert w.shape == (4, 2) and torch.allclose(w.sum(-1), torch.ones(4))
    logits = t @ r.weight.T + r.bias
    assert torch.allclose(w, torch.softmax(logits / 10.0, -1))


@pytest.mark.parametrize("temperature", [5.0, 10.0])
def test_every_router_has_the_models_temperature(temperature):
    model = tiny_lavin(temperature=temperature)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == len(model.llama.layers) + len(model.visual.transformer.resblocks)
    assert {r.temperature for r in routers} == {temperature}
    assert IMAGE != TEXT
