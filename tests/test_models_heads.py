"""Classification heads and the toy modules: sizes and formulas."""

from __future__ import annotations

import pytest
import torch

from mlomae.models.heads import LinearHead, MLPHead
from mlomae.models.toy import MLP, LogPenalty, SampleWeights


def test_linear_head_batchnorm_probe_formula():
    """MAE's linear probe: BatchNorm1d(affine=False, eps=1e-6) then Linear. In training mode the
    output equals fc((x - mean) / sqrt(biased var + 1e-6)); only the linear layer has parameters."""
    torch.manual_seed(0)
    head = LinearHead(embed_dim=8, num_classes=3, norm=True)
    assert sum(p.numel() for p in head.parameters()) == 8 * 3 + 3
    x = torch.randn(16, 8) * 5 + 2
    z = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(head(x), head.fc(z))
    plain = LinearHead(8, 3)
    torch.testing.assert_close(plain(x), x @ plain.fc.weight.T + plain.fc.bias)


@pytest.mark.parametrize("depth,expected", [(0, 8 * 3 + 3), (1, 8 * 5 + 5 + 5 * 3 + 3),
                                            (2, 8 * 5 + 5 + 5 * 5 + 5 + 5 * 3 + 3)])
def test_mlp_head_parameter_count(depth, expected):
    """Closed-form parameter counts for embed 8, hidden 5, 3 classes."""
    head = MLPHead(embed_dim=8, num_classes=3, hidden_dim=5, depth=depth)
    assert sum(p.numel() for p in head.parameters()) == expected
    assert head(torch.randn(4, 8)).shape == (4, 3)


def test_toy_modules():
    """LogPenalty returns its init vector as a parameter; SampleWeights indexes per-sample logits;
    MLP(3, 4, 2, depth=2) has 3*4+4 + 4*4+4 + 4*2+2 = 46 parameters, depth 0 is linear."""
    pen = LogPenalty(3, init=-1.0)
    assert isinstance(pen(), torch.nn.Parameter) and pen().tolist() == [-1.0, -1.0, -1.0]
    w = SampleWeights(5, init=0.5)
    assert w().shape == (5,) and w(torch.tensor([0, 3])).tolist() == [0.5, 0.5]
    assert sum(p.numel() for p in MLP(3, 4, 2, depth=2).parameters()) == 46
    lin = MLP(3, 4, 2, depth=0)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), x @ lin.net[0].weight.T + lin.net[0].bias)
    with pytest.raises(ValueError, match="'swish'"):
        MLP(3, 4, 2, act="swish")
