"""Linear CKA (centred kernel alignment) with the unbiased HSIC estimator, one-shot and streaming.

Provenance and definitions (formulas from ``research/ecosystem.md`` §3; the code is ours):

- Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"):
  ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear Grams ``K = X Xᵀ``, ``L = Y Yᵀ``.
- Biased ``HSIC_0 = tr(K H L H) / (n - 1)²`` (``H`` the centring matrix). With few samples and many
  features it drifts toward 1 even for independent features (measured: d=4096, n=64 gives 0.985),
  so it is kept for comparison only.
- Unbiased ``HSIC_1`` (Song et al. 2012, "Feature Selection via Dependence Maximization"), with
  ``K~``, ``L~`` the Grams with zeroed diagonals::

      HSIC_1 = [tr(K~ L~) + 1ᵀK~1 · 1ᵀL~1 / ((n-1)(n-2)) - 2 · 1ᵀK~L~1 / (n-2)] / (n (n-3))

  It needs ``n >= 4``. It equals the U-centred Gram inner product of Kornblith's reference code
  divided by ``n (n-3)``, so ``HSIC_1(K, K) >= 0`` and CKA stays well defined.
- Minibatch CKA (Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same
  Things?"): ``HSIC_1`` is computed per minibatch and the xy, xx and yy terms are *summed* over
  batches before taking the ratio. Averaging per-batch CKA values is a different (biased) quantity.

:class:`StreamingCKA` computes all pairs of many feature sets (the cut points of several models) at
once: per batch one Gram per feature set, and every pairwise ``HSIC_1`` term as matrix products of
the flattened Grams (``tr(K~ L~) = <K~, L~>_F``, ``1ᵀK~L~1 = (K~1)·(L~1)``). Everything is float64.

Centring. Features are centred (column means of the batch subtracted, in float64) before any Gram
is built. Both estimators are *exactly* invariant to a per-batch shift ``X -> X + 1 mᵀ``: it changes
``K_ij`` by ``a_i + a_j + c``, which the U-centring of HSIC_1 (and the double centring ``H K H`` of
HSIC_0) removes identically. So centring each minibatch by its own mean leaves every per-batch term,
and hence the streaming sum, unchanged in exact arithmetic, while in floating point it removes the
cancellation that made uncentred Grams of features with a large common offset (e.g. 150 on every
dimension, or one channel at 1e3) lose all their digits and return NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from surgery.errors import SurgeryError

__all__ = [
    "Estimator", "CKAInputError", "gram", "hsic_unbiased", "hsic_biased", "cka", "StreamingCKA",
    "block_similarity",
]

Estimator = Literal["unbiased", "biased"]

# The unbiased estimator divides by n (n - 3) and (n - 2): it is undefined below 4 samples.
MIN_SAMPLES_UNBIASED = 4
MIN_SAMPLES_BIASED = 2


class CKAInputError(SurgeryError, ValueError):
    """Features that CKA cannot use: too few samples, mismatched batch sizes, wrong shapes."""


def _as_float64_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Return ``x`` as an ``(n, d)`` float64 tensor; extra dimensions are flattened per sample."""
    # Similarity is a measurement, never trained through: detach so no autograd graph is kept.
    t = torch.as_tensor(x).detach()
    if t.ndim == 0:
        raise CKAInputError(f"{name} must have a sample dimension, got a scalar")
    if t.ndim == 1:
        # One feature per sample: a column, not a single sample with many features.
        t = t.unsqueeze(1)
    elif t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    return t.to(torch.float64)


# A column whose centred values are within this many ulps of its magnitude is constant over the
# batch up to the rounding of its mean; it is set to exactly zero so that a constant feature set is
# recognised as one (NaN CKA) instead of measuring rounding noise.
_CONSTANT_ULPS = 64


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract the ``(n, d)`` float64 matrix's column means; columns constant up to rounding become 0.

    Exact for CKA: both HSIC estimators are invariant to a per-batch shift (module docstring).
    """
    xc = x - x.mean(dim=0, keepdim=True)
    if xc.numel() == 0:
        return xc
    size = x.abs().amax(dim=0)
    constant = xc.abs().amax(dim=0) <= _CONSTANT_ULPS * torch.finfo(torch.float64).eps * size
    return xc.masked_fill(constant, 0.0)


def _min_samples(estimator: str) -> int:
    if estimator == "unbiased":
        return MIN_SAMPLES_UNBIASED
    if estimator == "biased":
        return MIN_SAMPLES_BIASED
    raise CKAInputError(f"unknown CKA estimator {estimator!r}: use 'unbiased' or 'biased'")


def _check_n(n: int, estimator: str) -> None:
    need = _min_samples(estimator)
    if n < need:
        raise CKAInputError(
            f"{estimator} CKA needs at least {need} samples per batch, got {n}: use larger batches "
            "(64 or more recommended) or drop_last=True on the data loader"
        )


def gram(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Linear Gram matrix ``X Xᵀ`` in float64.

    Args:
        x: ``(n, d)`` features (extra dimensions are flattened per sample).

    Returns:
        The ``(n, n)`` float64 Gram matrix, on the device of ``x``.
    """
    x64 = _as_float64_matrix(x, "x")
    return x64 @ x64.T


def _zero_diagonal(k: torch.Tensor) -> torch.Tensor:
    return k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC_1 (Song et al. 2012) of Gram matrices, batched over leading dimensions.

    Args:
        k: ``(..., n, n)`` Gram matrices; their diagonals are ignored (treated as zero).
        l: ``(..., n, n)`` Gram matrices, broadcastable against ``k``.

    Returns:
        ``(...)`` tensor of HSIC_1 values in float64.

    Raises:
        CKAInputError: if ``n < 4``.
    """
    n = k.shape[-1]
    _check_n(n, "unbiased")
    kt = _zero_diagonal(k.to(torch.float64))
    lt = _zero_diagonal(l.to(torch.float64))
    # tr(K~ L~) = sum_ij K~_ij L~_ji; the transpose keeps it exact for non-symmetric inputs.
    trace_kl = (kt * lt.mT).sum(dim=(-2, -1))
    sum_k = kt.sum(dim=(-2, -1))
    sum_l = lt.sum(dim=(-2, -1))
    # 1ᵀ K~ L~ 1 = (1ᵀ K~) · (L~ 1): column sums of K~ against row sums of L~.
    kl_sum = (kt.sum(dim=-2) * lt.sum(dim=-1)).sum(dim=-1)
    return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * kl_sum / (n - 2)) / (n * (n - 3))


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` for ``(..., n, n)`` Grams, without building ``H``."""
    return (
        k
        - k.mean(dim=-2, keepdim=True)
        - k.mean(dim=-1, keepdim=True)
        + k.mean(dim=(-2, -1), keepdim=True)
    )


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Biased HSIC_0 ``tr(K H L H) / (n-1)²`` of Gram matrices, batched over leading dimensions.

    Args:
        k: ``(..., n, n)`` Gram matrices.
        l: ``(..., n, n)`` Gram matrices, broadcastable against ``k``.

    Returns:
        ``(...)`` tensor of HSIC_0 values in float64.
    """
    n = k.shape[-1]
    _check_n(n, "biased")
    kc = _centre_gram(k.to(torch.float64))
    lc = _centre_gram(l.to(torch.float64))
    # H is idempotent, so tr(K H L H) = <H K H, H L H>_F (transposed for non-symmetric inputs).
    return (kc * lc.mT).sum(dim=(-2, -1)) / (n - 1) ** 2


# A self-HSIC below this fraction of its scale (tr(K)² over the estimator's normaliser) is rounding
# noise left by cancellation: the feature set is (numerically) constant over the samples.
_REL_ZERO = 1e-10


def _is_degenerate(h_self: np.ndarray | float, scale: np.ndarray | float) -> np.ndarray:
    return np.asarray(h_self) <= _REL_ZERO * np.asarray(scale)


def _ratio(hxy: float, hxx: float, hyy: float, scale_x: float, scale_y: float) -> float:
    # A feature set with no variance has no defined similarity: NaN, not a misleading 0 or inf.
    if _is_degenerate(hxx, scale_x) or _is_degenerate(hyy, scale_y):
        return float("nan")
    return hxy / math.sqrt(hxx * hyy)


def _normaliser(n: int, estimator: str) -> int:
    return n * (n - 3) if estimator == "unbiased" else (n - 1) ** 2


def _feature_form_terms(x: torch.Tensor, y: torch.Tensor, estimator: str) -> tuple[float, float, float]:
    """``n (n-3) HSIC_1`` (or ``(n-1)² HSIC_0``) for xy, xx, yy without any ``n x n`` matrix.

    Uses ``tr(K L) = ||Xᵀ Y||²_F`` and, for the unbiased estimator, removes the diagonal
    contributions analytically: ``tr(K~ L~) = tr(K L) - Σ K_ii L_ii``, ``1ᵀK~1 = ||Xᵀ1||² - Σ K_ii``
    and ``K~1 = X (Xᵀ1) - diag(K)``. The common scale factor cancels in the CKA ratio.
    """
    n = x.shape[0]
    if estimator == "biased":
        xc = x - x.mean(dim=0, keepdim=True)
        yc = y - y.mean(dim=0, keepdim=True)
        hxy = torch.linalg.matrix_norm(xc.T @ yc) ** 2
        hxx = torch.linalg.matrix_norm(xc.T @ xc) ** 2
        hyy = torch.linalg.matrix_norm(yc.T @ yc) ** 2
        return float(hxy), float(hxx), float(hyy)

    def parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        diag = (a * a).sum(dim=1)  # K_ii
        col = a.sum(dim=0)  # Xᵀ 1
        total = col @ col - diag.sum()  # 1ᵀ K~ 1
        rows = a @ col - diag  # K~ 1
        return diag, total, rows

    dx, sx, rx = parts(x)
    dy, sy, ry = parts(y)

    def term(a, b, da, db, sa, sb, ra, rb) -> float:
        trace = torch.linalg.matrix_norm(a.T @ b) ** 2 - (da * db).sum()
        return float(trace + sa * sb / ((n - 1) * (n - 2)) - 2.0 * (ra @ rb) / (n - 2))

    return (
        term(x, y, dx, dy, sx, sy, rx, ry),
        term(x, x, dx, dx, sx, sx, rx, rx),
        term(y, y, dy, dy, sy, sy, ry, ry),
    )


def cka(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    estimator: Estimator = "unbiased",
    form: Literal["auto", "gram", "feature"] = "auto",
) -> float:
    """Linear CKA of two feature matrices over the same samples, computed in float64.

    Args:
        x: ``(n, d1)`` features (torch or numpy; extra dimensions are flattened per sample).
        y: ``(n, d2)`` features of the same ``n`` samples.
        estimator: ``"unbiased"`` (HSIC_1, the default; needs ``n >= 4``) or ``"biased"`` (HSIC_0,
            inflated toward 1 when ``d`` is large relative to ``n``).
        form: ``"gram"`` builds ``n x n`` Grams (cheap when ``n`` is small, e.g. flattened conv
            maps); ``"feature"`` builds ``d1 x d2`` cross-covariances (cheap when ``n`` is large and
            ``d`` small, e.g. pooled features); ``"auto"`` picks the form with fewer multiply-adds.

    Returns:
        The CKA value (NaN when a feature set is constant over the samples).

    Raises:
        CKAInputError: on mismatched sample counts, too few samples or an unknown estimator.
    """
    x64 = _as_float64_matrix(x, "x")
    y64 = _as_float64_matrix(y, "y").to(x64.device)
    n = x64.shape[0]
    if y64.shape[0] != n:
        raise CKAInputError(f"x and y must have the same number of samples, got {n} and {y64.shape[0]}")
    _check_n(n, estimator)
    x64, y64 = _centre(x64), _centre(y64)
    if form == "auto":
        d1, d2 = x64.shape[1], y64.shape[1]
        # Feature form: ~n·(d1·d2 + d1² + d2²) multiply-adds; Gram form: ~n²·(d1 + d2) + 3n².
        form = "feature" if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2 + 3) else "gram"
    if form == "feature":
        # The feature-form terms are not divided by the normaliser, so neither are their scales.
        tx, ty = float((x64 * x64).sum()), float((y64 * y64).sum())
        return _ratio(*_feature_form_terms(x64, y64, estimator), tx * tx, ty * ty)
    if form != "gram":
        raise CKAInputError(f"unknown CKA form {form!r}: use 'auto', 'gram' or 'feature'")
    k = x64 @ x64.T
    l = y64 @ y64.T  # noqa: E741
    hsic = hsic_unbiased if estimator == "unbiased" else hsic_biased
    grams = torch.stack([k, l])
    # One batched call for xy, xx, yy.
    h = hsic(grams[[0, 0, 1]], grams[[1, 0, 1]])
    norm = _normaliser(n, estimator)
    scale_x = float(torch.trace(k)) ** 2 / norm
    scale_y = float(torch.trace(l)) ** 2 / norm
    return _ratio(float(h[0]), float(h[1]), float(h[2]), scale_x, scale_y)


class StreamingCKA:
    """All-pairs minibatch CKA over many feature sets, accumulated over batches.

    Each call to :meth:`update` takes one ``(n, d_i)`` feature matrix per feature set (e.g. per cut
    point of several models), all for the same ``n`` samples. Per batch it builds one Gram per
    feature set and adds every pairwise HSIC to a ``P x P`` float64 accumulator with three matrix
    products (see the module docstring). :meth:`compute` takes the ratio at the end, as Nguyen et
    al. (2021) prescribe. Memory is ``O(P n²)`` for one batch plus ``O(P²)``, independent of the
    number of batches.

    Batches must have at least 4 samples (the unbiased estimator divides by ``n (n-3)``); use 64 or
    more, since small batches make the estimate noisier, and ``drop_last=True`` on loaders whose
    last batch could be tiny. Batch sizes may vary between updates.

    The ``"biased"`` estimator sums HSIC_0 over batches instead. It is offered for comparison with
    earlier work (DeRy) only: with batch-sized ``n`` and high-dimensional features it drifts toward
    1 for unrelated representations.

    Example:
        >>> acc = StreamingCKA()
        >>> for batch in loader:                      # doctest: +SKIP
        ...     acc.update([f(batch) for f in cut_point_features])
        >>> sim = acc.compute()                       # (P, P) numpy array, unit diagonal

    Args:
        estimator: ``"unbiased"`` (default) or ``"biased"``.
        device: where Grams and accumulators live; default: the device of the first features seen.
    """

    def __init__(self, estimator: Estimator = "unbiased", device: torch.device | str | None = None):
        _min_samples(estimator)  # validates the name
        self.estimator = estimator
        self.device = torch.device(device) if device is not None else None
        self.num_features: int | None = None
        self.num_samples = 0
        self.num_batches = 0
        self._hsic: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # per feature set, to tell constant sets from weak ones

    def update(self, features: Sequence[torch.Tensor | np.ndarray]) -> None:
        """Add one batch: a list with one ``(n, d_i)`` feature matrix per feature set.

        Args:
            features: ``P`` matrices over the same ``n`` samples, in the same order at every call.
                Extra dimensions are flattened per sample.

        Raises:
            CKAInputError: if ``n`` is below the estimator's minimum, the matrices disagree on
                ``n``, or ``P`` changed since the first batch.
        """
        if len(features) == 0:
            raise CKAInputError("StreamingCKA.update needs at least one feature matrix")
        if self.num_features is not None and len(features) != self.num_features:
            raise CKAInputError(
                f"StreamingCKA got {len(features)} feature sets, expected {self.num_features} as before"
            )
        device = self.device or torch.as_tensor(features[0]).device
        mats = [_as_float64_matrix(f, f"features[{i}]").to(device) for i, f in enumerate(features)]
        sizes = {m.shape[0] for m in mats}
        if len(sizes) != 1:
            raise CKAInputError(
                f"all feature sets of one batch must have the same samples, got sizes {sorted(sizes)}"
            )
        n = sizes.pop()
        _check_n(n, self.estimator)
        # Centre each set by this batch's own mean: exact for both estimators (module docstring),
        # and without it a large common offset cancels every digit of the HSIC terms.
        mats = [_centre(m) for m in mats]

        # One Gram per feature set: (P, n, n). Sets of equal width are stacked and multiplied in one
        # batched matmul (a zoo has only a few distinct widths), which avoids hundreds of tiny
        # kernel launches per batch.
        grams = torch.empty(len(mats), n, n, dtype=torch.float64, device=device)
        by_width: dict[int, list[int]] = {}
        for i, m in enumerate(mats):
            by_width.setdefault(m.shape[1], []).append(i)
        for idx in by_width.values():
            stacked = torch.stack([mats[i] for i in idx])
            grams[idx] = torch.bmm(stacked, stacked.transpose(1, 2))
        scale = torch.diagonal(grams, dim1=-2, dim2=-1).sum(dim=-1) ** 2 / _normaliser(n, self.estimator)
        if self.estimator == "unbiased":
            grams = _zero_diagonal(grams)
            flat = grams.reshape(len(mats), n * n)
            rows = grams.sum(dim=-1)  # K~ 1, (P, n); Grams are symmetric so row = column sums
            totals = rows.sum(dim=-1)  # 1ᵀ K~ 1, (P,)
            hsic = (
                flat @ flat.T
                + torch.outer(totals, totals) / ((n - 1) * (n - 2))
                - 2.0 * (rows @ rows.T) / (n - 2)
            ) / (n * (n - 3))
        else:
            centred = _centre_gram(grams).reshape(len(mats), n * n)
            hsic = (centred @ centred.T) / (n - 1) ** 2

        if self._hsic is None:
            self._hsic = torch.zeros_like(hsic)
            self._scale = torch.zeros_like(scale)
            self.num_features = len(mats)
            self.device = device
        self._hsic += hsic
        self._scale += scale
        self.num_samples += n
        self.num_batches += 1

    def all_reduce(self) -> None:
        """Sum the accumulators over the ranks of a torch.distributed group, in place.

        Each rank updates with its own share of the batches; the HSIC sums (and sample and batch
        counts) are additive over batches, so after this every rank holds what one process fed all
        batches would, up to the order of floating-point additions. A no-op without a group; every
        rank must call it. A rank that saw no batch contributes zeros.

        Raises:
            CKAInputError: ranks disagree on the number of feature sets.
        """
        from surgery import distributed

        if not distributed.active():
            return
        counts = {c for c in distributed.all_gather_objects(self.num_features) if c is not None}
        if len(counts) > 1:
            raise CKAInputError(f"ranks fed different numbers of feature sets: {sorted(counts)}")
        if not counts:
            return
        p = counts.pop()
        # Reduced on the CPU: surgery's group always has a CPU (gloo) backend, whatever the device.
        hsic = self._hsic.cpu() if self._hsic is not None else torch.zeros(p, p, dtype=torch.float64)
        scale = self._scale.cpu() if self._scale is not None else torch.zeros(p, dtype=torch.float64)
        totals = torch.tensor([self.num_samples, self.num_batches], dtype=torch.int64)
        distributed.all_reduce_sum(hsic, scale, totals)
        device = self.device or torch.device("cpu")
        self._hsic, self._scale = hsic.to(device), scale.to(device)
        self.num_features, self.device = p, device
        self.num_samples, self.num_batches = int(totals[0]), int(totals[1])

    def hsic(self) -> np.ndarray:
        """The accumulated ``P x P`` HSIC sums (symmetrised), float64."""
        if self._hsic is None:
            raise CKAInputError("StreamingCKA has no batches yet: call update() first")
        h = self._hsic.cpu().numpy()
        # Floating-point matmul is not bitwise symmetric; the true matrix is.
        return (h + h.T) / 2.0

    def compute(self) -> np.ndarray:
        """The ``P x P`` CKA matrix: symmetric, unit diagonal, NaN rows for constant feature sets."""
        h = self.hsic()
        diag = np.diag(h).copy()
        valid = ~_is_degenerate(diag, self._scale.cpu().numpy())
        diag[~valid] = 1.0  # placeholder, those rows and columns become NaN below
        sim = h / np.sqrt(np.outer(diag, diag))
        sim[~valid, :] = np.nan
        sim[:, ~valid] = np.nan
        defined = np.flatnonzero(valid)
        sim[defined, defined] = 1.0  # exact ones, not 1 ± rounding
        return sim

    def reset(self) -> None:
        """Forget all batches (keeps the estimator and device)."""
        self.num_features = None
        self.num_samples = 0
        self.num_batches = 0
        self._hsic = None
        self._scale = None


def block_similarity(sim_in: float | np.ndarray, sim_out: float | np.ndarray) -> float | np.ndarray:
    """Similarity of two blocks: CKA of their inputs plus CKA of their outputs (DeRy's definition).

    Two blocks are interchangeable when they consume similar representations *and* produce similar
    ones, so both ends count equally. Works elementwise on matrices of pairs.

    Args:
        sim_in: CKA between the blocks' inputs (the features at their start cut points).
        sim_out: CKA between the blocks' outputs (the features at their end cut points).

    Returns:
        ``sim_in + sim_out``, in ``[-2, 2]`` (2 for identical blocks).
    """
    if isinstance(sim_in, np.ndarray) or isinstance(sim_out, np.ndarray):
        return np.add(sim_in, sim_out)
    return float(sim_in) + float(sim_out)
