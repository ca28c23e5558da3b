"""Training-free proxies: NASWOT, LogME, linear probe, params, Kendall tau."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.proxy import (
    ProxyError,
    activation_modules,
    kendall_tau,
    linear_probe_accuracy,
    logme,
    naswot_kernel,
    naswot_score,
    param_count,
    score_candidate,
)


def mlp(width: int, act: type[nn.Module] = nn.ReLU, depth: int = 2, d_in: int = 16) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 4))


def test_naswot_kernel_is_units_minus_hamming():
    torch.manual_seed(0)
    net = mlp(8, depth=1)
    x = torch.randn(5, 16)
    with torch.no_grad():
        kernel = naswot_kernel(net, x)
        codes = (net[0](x) > 0).float()
    hamming = torch.cdist(codes, codes, p=1).double()
    torch.testing.assert_close(kernel, codes.shape[1] - hamming)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU])
def test_naswot_prefers_distinct_activation_patterns(act):
    torch.manual_seed(0)
    x = torch.randn(16, 16)
    wide = mlp(256, act)
    score = naswot_score(wide, x)
    assert math.isfinite(score)
    # Same net, constant input: every sample has the same code, K is singular.
    assert naswot_score(wide, x[:1].expand(16, -1)) == float("-inf")
    # A net whose units are always on: identical codes for every input.
    saturated = mlp(256, act)
    with torch.no_grad():
        for layer in saturated:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(1e-3)
                layer.bias.fill_(10.0)
    assert naswot_score(saturated, x) < score
    # More units that still separate the samples give a larger kernel determinant.
    assert naswot_score(mlp(1024, act), x) > naswot_score(mlp(32, act), x)


def test_naswot_restores_mode_and_hooks_timm_activations():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    model.train()
    assert activation_modules(model)
    score = score_candidate(model, torch.randn(4, 3, 64, 64), proxy="naswot")
    assert math.isfinite(score)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def _noisy_one_hot(labels: torch.Tensor, k: int, d: int, noise: float) -> torch.Tensor:
    feats = torch.zeros(labels.shape[0], d)
    feats[:, :k] = nn.functional.one_hot(labels, k).float()
    return feats + noise * torch.randn_like(feats)


def _logme_reference(f: torch.Tensor, labels: torch.Tensor, iters: int = 100) -> float:
    """Straightforward D x D evidence maximisation (You et al. 2021, Algorithm 1), one class at a time."""
    f = f.double()
    n, d = f.shape
    sigma, v = torch.linalg.eigh(f.T @ f)
    evidences = []
    for c in labels.unique():
        y = (labels == c).double()
        alpha, beta = 1.0, 1.0
        for _ in range(iters):
            a_inv = v @ torch.diag(1 / (alpha + beta * sigma)) @ v.T
            m = beta * a_inv @ f.T @ y
            gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
            old = alpha / beta
            alpha = gamma / (float(m @ m) + 1e-5)
            beta = (n - gamma) / (float(((f @ m - y) ** 2).sum()) + 1e-5)
            if abs(alpha / beta - old) <= 1e-12 * old:
                break
        a_inv = v @ torch.diag(1 / (alpha + beta * sigma)) @ v.T
        m = beta * a_inv @ f.T @ y
        ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * float(torch.log(alpha + beta * sigma).sum())
              - beta / 2 * float(((f @ m - y) ** 2).sum()) - alpha / 2 * float(m @ m) - n / 2 * math.log(2 * math.pi))
        evidences.append(ev / n)
    return sum(evidences) / len(evidences)


@pytest.mark.parametrize("n,d", [(120, 12), (20, 40)])
def test_logme_matches_the_direct_formula(n, d):
    torch.manual_seed(0)
    labels = torch.arange(n) % 3
    f = _noisy_one_hot(labels, 3, d, 0.5)
    assert logme(f, labels, tol=1e-12) == pytest.approx(_logme_reference(f, labels), rel=1e-6, abs=1e-6)


def test_logme_prefers_informative_features():
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    informative = _noisy_one_hot(labels, 4, 32, 0.3)
    random = torch.randn(200, 32)
    assert logme(informative, labels) > logme(random, labels)
    assert logme(informative.numpy(), labels.numpy()) == pytest.approx(logme(informative, labels))


def test_linear_probe_separable_and_random_labels():
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    feats = _noisy_one_hot(labels, 4, 32, 0.1)
    assert linear_probe_accuracy(feats, labels) >= 0.99
    shuffled = labels[torch.randperm(200)]
    assert linear_probe_accuracy(torch.randn(200, 32), shuffled) < 0.4  # chance is 0.25


def test_score_candidate_all_proxies_on_a_timm_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    batches = [torch.randn(6, 3, 64, 64) for _ in range(2)]
    labels = [torch.arange(6) % 2, torch.arange(6) % 2]
    for proxy in ("logme", "naswot", "linear"):
        assert math.isfinite(score_candidate(model, batches, labels, proxy=proxy))
    assert score_candidate(model, batches, proxy="params") == param_count(model)
    assert param_count(model) == sum(p.numel() for p in model.parameters())


def test_score_candidate_feature_fn_and_errors():
    torch.manual_seed(0)
    net = mlp(64)
    labels = torch.arange(40) % 2
    x = torch.randn(40, 16)
    x[:, 0] += 4 * labels  # the label is linearly readable from the input
    first_layer = lambda model, inp: model[1](model[0](inp))  # noqa: E731
    assert score_candidate(net, x, labels, proxy="linear", feature_fn=first_layer) >= 0.9
    with pytest.raises(ProxyError):
        score_candidate(net, x, proxy="logme")
    with pytest.raises(SurgeryError):
        score_candidate(net, x, labels, proxy="synflow")


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    tau, p = kendall_tau([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], return_pvalue=True)
    assert -1 <= tau <= 1 and 0 <= p <= 1


@pytest.mark.parametrize("name", ["test_convnext", "test_vit", "test_efficientnet"])
def test_dissected_blocks_keep_timm_activations_for_naswot(name):
    # timm's GELU/Swish modules must stay modules in the traced blocks (not inlined into F.gelu),
    # otherwise a stitched chain of such blocks has nothing for NASWOT to hook.
    from surgery.dissection import dissect

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    expected = len(activation_modules(model))
    assert expected
    dis = dissect(model, (3, 64, 64), name=name)
    hooked = sum(len(activation_modules(block)) for block in dis.blocks)
    assert hooked == expected
    chain = nn.Sequential(*dis.blocks)
    assert math.isfinite(naswot_score(chain, torch.randn(6, 3, 64, 64)))
