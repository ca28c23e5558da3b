"""Training-free proxies that rank candidate networks on a few target batches.

Higher is better for every proxy here; the parameter count is always offered as the baseline any
proxy has to beat (ZiCo, Li et al. 2023; NAS-Bench-Suite-Zero, Krishnakumar et al. 2022: many
proxies do not). See ``research/ecosystem.md`` §6 and ``research/dery.md`` §5, §9.5.

* **NASWOT** (Mellor et al. 2021, "Neural Architecture Search without Training"), generalised as
  DeRy uses it: every sample gets a binary code from the signs of its activations at each hooked
  activation module; the kernel ``K = sum_layers c c^T + (1 - c)(1 - c)^T`` (units minus Hamming
  distance) scores ``log|det K|``. Differences from DeRy's port: we hook only activation modules
  (ReLU family, GELU, SiLU, Mish, Hardswish, ...), not ``nn.Linear``/attention/dropout outputs, so
  wide linear outputs do not dominate ``K``; the code is the pre-activation sign, which for all of
  these functions equals the sign of the output (``f(x) > 0`` iff ``x > 0``), so we read the output
  and in-place activations are safe. Like DeRy we divide ``log|det K|`` by the batch size (a
  per-sample score, comparable across batch sizes) and average over batches. Unlike DeRy the model
  is scored in eval mode by default (pretrained BN statistics; ``train_mode=True`` for DeRy's).
* **LogME** (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the log marginal evidence of a Bayesian linear regression from features to one-hot
  labels, maximised over the prior and noise precisions by MacKay's fixed-point iteration, using the
  SVD (eigendecomposition of the smaller Gram matrix) so every iteration is O(min(n, D)). Vectorised
  over classes. Returns the mean over classes of the log-evidence per sample. Unlike the released
  fast code we keep the ``(D - k) log(alpha)`` term of the zero singular values when ``D > n``, so the
  value equals the exact ``D x D`` formula.
* **Linear probe**: closed-form ridge regression to one-hot labels with a stratified 2-fold split,
  returning held-out accuracy (the proxy ``research/dery.md`` §9.5 proposes).
* **Params**: number of parameters.

:func:`score_candidate` runs any of them on a model; :func:`kendall_tau` compares a proxy's ranking
with measured accuracies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from surgery.errors import SurgeryError
from surgery.stitch import ridge_regression

__all__ = [
    "ProxyError", "ACTIVATION_TYPES", "activation_modules", "naswot_kernel", "naswot_score", "logme",
    "linear_probe_accuracy", "param_count", "default_features", "extract_features", "score_candidate",
    "kendall_tau", "PROXIES",
]

FeatureFn = Callable[[nn.Module, Tensor], Tensor]


class ProxyError(SurgeryError, ValueError):
    """A proxy cannot be computed from what it was given (unknown name, missing labels, ...)."""


# Activations with f(x) > 0 iff x > 0, so the output sign is the pre-activation code.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish,
)
# timm's own activation classes (timm.layers.activations*), matched by name to avoid importing
# private modules; all of them have the same sign property.
_ACTIVATION_NAMES = frozenset({
    "gelu", "gelutanh", "quickgelu", "swish", "swishme", "swishauto", "silu", "mish", "mishme",
    "mishauto", "hardswish", "hardswishme", "hardswishauto", "hardmish", "hardmishme", "hardmishauto",
    "prelu", "leakyrelu", "relu", "relu6",
})


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """Activation modules NASWOT hooks: :data:`ACTIVATION_TYPES` and timm's equivalents."""
    return [m for m in model.modules()
            if isinstance(m, ACTIVATION_TYPES) or type(m).__name__.lower() in _ACTIVATION_NAMES]


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Temporarily set train/eval mode, restoring every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(batches: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [batches] if isinstance(batches, Tensor) else list(batches)


# ----------------------------------------------------------------------------------------------
# NASWOT


def naswot_kernel(model: nn.Module, x: Tensor, modules: Sequence[nn.Module] | None = None) -> Tensor:
    """NASWOT kernel of one batch: ``K[i, j]`` = number of hooked units on which samples agree.

    Each call of a hooked module adds ``c c^T + (1 - c)(1 - c)^T`` with ``c`` the ``(batch, units)``
    binary code ``output > 0``, computed as ``2 c c^T - s_i - s_j + units`` (``s`` = ones per row)
    with one matrix product. Modules called several times per forward count once per call.

    Args:
        model: the network (its mode is left as it is).
        x: one input batch.
        modules: modules to hook; default :func:`activation_modules`.

    Returns:
        ``(batch, batch)`` float64 kernel.

    Raises:
        ProxyError: nothing was hooked.
    """
    modules = activation_modules(model) if modules is None else list(modules)
    if not modules:
        raise ProxyError(f"{type(model).__name__} has no activation modules for NASWOT to hook")
    b = x.shape[0]
    kernel = torch.zeros(b, b, dtype=torch.float64, device=x.device)

    def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:
        if not isinstance(out, Tensor) or out.numel() % b:
            return
        code = (out.detach() > 0).reshape(b, -1)
        units = code.shape[1]
        # 0/1 products accumulate exactly in float32 below 2**24 units; use float64 beyond.
        dtype = torch.float32 if units < 2**24 else torch.float64
        c = code.to(dtype)
        agree_on = (c @ c.T).to(torch.float64)
        ones = c.sum(1).to(torch.float64)
        kernel.add_(2 * agree_on - ones[:, None] - ones[None, :] + units)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return kernel


def naswot_score(model: nn.Module, batches: Tensor | Iterable[Tensor], *, train_mode: bool = False,
                 modules: Sequence[nn.Module] | None = None) -> float:
    """Generalised NASWOT: mean over batches of ``log|det K| / batch_size``.

    Args:
        model: the network.
        batches: one input batch or several.
        train_mode: run in train mode (BN batch statistics, as DeRy does) instead of eval mode.
        modules: modules to hook; default :func:`activation_modules`.

    Returns:
        The score; ``-inf`` when two samples of a batch share their code (``K`` singular).
    """
    dev = _device(model)
    scores = []
    with _mode(model, train_mode), torch.inference_mode():
        for x in _batches(batches):
            kernel = naswot_kernel(model, x.to(dev), modules)
            scores.append(torch.linalg.slogdet(kernel).logabsdet.item() / x.shape[0])
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# LogME


def _labels_one_hot(labels: Tensor | np.ndarray) -> Tensor:
    y = torch.as_tensor(np.asarray(labels)).reshape(-1)
    _, idx = torch.unique(y, return_inverse=True)  # any label values; classes absent are skipped
    return F.one_hot(idx).double()


def logme(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, *, max_iter: int = 100,
          tol: float = 1e-3) -> float:
    """LogME: mean log-evidence per sample of a Bayesian linear model from features to labels.

    Model per class ``k``: ``y_k = f w + e``, ``w ~ N(0, 1/alpha)``, ``e ~ N(0, 1/beta)``; ``alpha``
    and ``beta`` maximise the evidence by the fixed point ``alpha = gamma / |m|^2``,
    ``beta = (n - gamma) / |f m - y|^2``, ``gamma = sum sigma / (sigma + alpha / beta)``, all in the
    eigenbasis of ``f^T f`` (float64), for all classes at once.

    Args:
        features: ``(n, D)`` features.
        labels: ``(n,)`` class labels.
        max_iter: fixed-point iterations at most (it converges in a few).
        tol: stop when ``alpha / beta`` changes by less than this fraction for every class.

    Returns:
        Mean over classes of the log-evidence divided by ``n``.
    """
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features.detach())
    f = f.reshape(f.shape[0], -1).double().cpu()
    y = _labels_one_hot(labels)
    n, d = f.shape
    if y.shape[0] != n:
        raise ProxyError(f"{n} feature rows but {y.shape[0]} labels")
    # Eigen-decompose the smaller Gram matrix; x = projections of y on the left singular vectors.
    if n >= d:
        sigma, v = torch.linalg.eigh(f.T @ f)
        keep = sigma > sigma.max().clamp_min(0) * max(n, d) * torch.finfo(torch.float64).eps
        sigma, v = sigma[keep], v[:, keep]
        x = (v.T @ (f.T @ y)) / sigma.sqrt()[:, None]
    else:
        sigma, u = torch.linalg.eigh(f @ f.T)
        keep = sigma > sigma.max().clamp_min(0) * max(n, d) * torch.finfo(torch.float64).eps
        sigma, u = sigma[keep], u[:, keep]
        x = u.T @ y
    k = sigma.shape[0]
    sig = sigma[:, None]
    x2 = x * x  # (k, classes)
    res_x2 = (y * y).sum(0) - x2.sum(0)  # energy of y outside the span of f

    def terms(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gamma = (sig / (sig + t)).sum(0)
        m2 = (sig * x2 / (t + sig) ** 2).sum(0)
        res2 = (x2 / (1 + sig / t) ** 2).sum(0) + res_x2
        return gamma, m2, res2

    alpha = torch.ones(y.shape[1], dtype=torch.float64)
    beta = torch.ones_like(alpha)
    for _ in range(max_iter):
        t = alpha / beta
        gamma, m2, res2 = terms(t)
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if bool(((alpha / beta - t).abs() / t <= tol).all()):
            break
    _, m2, res2 = terms(alpha / beta)
    evidence = (
        k / 2.0 * torch.log(alpha)  # D/2 log(alpha) minus the (D - k) zero-eigenvalue terms
        + n / 2.0 * torch.log(beta)
        - 0.5 * torch.log(alpha + beta * sig).sum(0)
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - n / 2.0 * math.log(2 * math.pi)
    )
    return float((evidence / n).mean())


# ----------------------------------------------------------------------------------------------
# Linear probe and parameter count


def _stratified_folds(labels: Tensor, folds: int, seed: int) -> Tensor:
    """Fold index per sample: shuffle, then deal each class's samples round-robin."""
    n = labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(labels[perm], stable=True)]
    sorted_labels = labels[order]
    # Rank of each sample within its class = position minus the class's first position.
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    fold = torch.empty(n, dtype=torch.long)
    fold[order] = (torch.arange(n) - first) % folds
    return fold


def linear_probe_accuracy(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, *,
                          ridge: float = 1e-2, folds: int = 2, seed: int = 0) -> float:
    """Held-out accuracy of a closed-form ridge classifier (one-hot targets), stratified k-fold.

    Args:
        features: ``(n, D)`` features.
        labels: ``(n,)`` class labels.
        ridge: relative ridge strength (see :func:`surgery.stitch.ridge_regression`).
        folds: number of stratified folds (2: train on half, test on the other half, and swap).
        seed: shuffling seed.

    Returns:
        Fraction of samples classified correctly when held out.
    """
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features.detach())
    f = f.reshape(f.shape[0], -1).double().cpu()
    raw = torch.as_tensor(np.asarray(labels)).reshape(-1).cpu()
    _, y = torch.unique(raw, return_inverse=True)
    if y.shape[0] != f.shape[0]:
        raise ProxyError(f"{f.shape[0]} feature rows but {y.shape[0]} labels")
    if f.shape[0] < 2 * folds:
        raise ProxyError(f"a {folds}-fold linear probe needs at least {2 * folds} samples")
    fold = _stratified_folds(y, folds, seed)
    onehot = F.one_hot(y).double()
    correct = 0
    for k in range(folds):
        train, test = fold != k, fold == k
        a, b = ridge_regression(f[train], onehot[train], ridge)
        correct += int(((f[test] @ a + b).argmax(1) == y[test]).sum())
    return correct / f.shape[0]


def param_count(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Features and the entry point


def _pool(t: Tensor) -> Tensor:
    if t.dim() == 4:  # NCHW map
        return t.mean(dim=(2, 3))
    if t.dim() == 3:  # tokens
        return t.mean(dim=1)
    return t.reshape(t.shape[0], -1)


def default_features(model: nn.Module, x: Tensor) -> Tensor:
    """Pre-head features: timm's ``forward_features`` + ``forward_head(pre_logits=True)``.

    Falls back to ``forward_features`` with mean pooling (maps over space, tokens over tokens),
    then to the model output.
    """
    if hasattr(model, "forward_features"):
        feats = model.forward_features(x)
        if hasattr(model, "forward_head"):
            with contextlib.suppress(TypeError):
                return _pool(model.forward_head(feats, pre_logits=True))
        return _pool(feats)
    return _pool(model(x))


def extract_features(model: nn.Module, batches: Tensor | Iterable[Tensor],
                     feature_fn: FeatureFn | None = None) -> Tensor:
    """Features of every batch, concatenated, in eval mode without gradients, on the CPU."""
    fn = feature_fn or default_features
    dev = _device(model)
    with _mode(model, False), torch.inference_mode():
        return torch.cat([fn(model, x.to(dev)).reshape(x.shape[0], -1).float().cpu()
                          for x in _batches(batches)])


def _needs_labels(labels: Tensor | Sequence[Tensor] | None, proxy: str) -> Tensor:
    if labels is None:
        raise ProxyError(f"proxy {proxy!r} needs labels")
    if isinstance(labels, Tensor | np.ndarray):
        return torch.as_tensor(np.asarray(labels)).reshape(-1)
    return torch.cat([torch.as_tensor(np.asarray(lab)).reshape(-1) for lab in labels])


def _logme_proxy(model, batches, labels, feature_fn, **kw):
    return logme(extract_features(model, batches, feature_fn), _needs_labels(labels, "logme"), **kw)


def _linear_proxy(model, batches, labels, feature_fn, **kw):
    feats = extract_features(model, batches, feature_fn)
    return linear_probe_accuracy(feats, _needs_labels(labels, "linear"), **kw)


def _naswot_proxy(model, batches, labels, feature_fn, **kw):
    return naswot_score(model, batches, **kw)


def _params_proxy(model, batches, labels, feature_fn, **kw):
    return float(param_count(model))


PROXIES: dict[str, Callable[..., float]] = {
    "logme": _logme_proxy,
    "naswot": _naswot_proxy,
    "linear": _linear_proxy,
    "params": _params_proxy,
}


def score_candidate(model: nn.Module, batches: Tensor | Iterable[Tensor],
                    labels: Tensor | Sequence[Tensor] | None = None, proxy: str = "logme",
                    feature_fn: FeatureFn | None = None, **kwargs) -> float:
    """Score a candidate network with a training-free proxy (higher is better).

    Args:
        model: the candidate (its train/eval mode is restored afterwards).
        batches: input batch, or batches, of target images.
        labels: labels matching ``batches`` (one tensor for all, or one per batch); needed by
            ``"logme"`` and ``"linear"``.
        proxy: ``"logme"``, ``"naswot"``, ``"linear"`` or ``"params"``.
        feature_fn: ``feature_fn(model, x)`` -> pre-head features; default
            :func:`default_features`.
        **kwargs: passed to the proxy (e.g. ``ridge`` for ``"linear"``, ``train_mode`` for
            ``"naswot"``).

    Returns:
        The score as a float.

    Raises:
        ProxyError: unknown proxy or missing labels.
    """
    if proxy not in PROXIES:
        raise ProxyError(f"unknown proxy {proxy!r}; choose from {', '.join(PROXIES)}")
    return float(PROXIES[proxy](model, batches, labels, feature_fn, **kwargs))


def kendall_tau(scores: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray, *,
                return_pvalue: bool = False) -> float | tuple[float, float]:
    """Kendall rank correlation (tau-b, ties handled) between proxy scores and measured results.

    Args:
        scores: proxy scores of the candidates.
        truth: the measured quantity (e.g. fine-tuned accuracy), same order.
        return_pvalue: also return the two-sided p-value.

    Returns:
        ``tau`` (``nan`` if either side is constant), or ``(tau, pvalue)``.
    """
    a, b = np.asarray(scores, dtype=float), np.asarray(truth, dtype=float)
    if a.shape != b.shape:
        raise ProxyError(f"{a.shape[0]} scores but {b.shape[0]} measurements")
    res = stats.kendalltau(a, b)
    tau, p = float(res.statistic), float(res.pvalue)
    return (tau, p) if return_pvalue else tau
