"""The M-step: a new GMM from sufficient statistics, with Kaldi's or scikit-learn's rules.

``style="kaldi"`` follows ``MleDiagGmmUpdate`` / ``MleFullGmmUpdate``: a component is
updated only if its occupancy exceeds ``min_gaussian_occupancy`` and its weight exceeds
``min_gaussian_weight``; otherwise it is removed (``remove_low_count_gaussians``, never the
last one) or keeps its old mean and covariance with weight ``max(prob, min_gaussian_weight)``.
Diagonal variances get an absolute floor (``min_variance``); full covariances an eigenvalue
floor ``max(variance_floor, λ_max / max_condition)``.

``update_flags`` are Kaldi's ``--update-flags``: a subset of ``m`` (means), ``v``
(variances) and ``w`` (weights); what is not in them keeps the previous model's value, and
variances updated without means are centred on the previous means (``MleDiagGmmUpdate``).

``style="sklearn"`` is ``GaussianMixture._m_step``: occupancies get ``10·eps``, every
component is updated, ``reg_covar`` is added to the diagonal, nothing is floored or removed.

The update returns what it did (:class:`UpdateReport`) instead of logging it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from emdist.errors import UserError
from emdist.models.gmm import GMM
from emdist.models.stats import GmmStats


@dataclass(frozen=True)
class MStepOptions:
    """Options of the update (Kaldi's names and defaults).

    Attributes
    ----------
    style : {"kaldi", "sklearn"}
    min_variance : float
        Absolute variance floor for diagonal models (Kaldi ``--min-variance``).
    variance_floor : float
        Eigenvalue floor for full models (Kaldi ``--variance-floor``).
    max_condition : float
        Largest ratio of eigenvalues of a full covariance (Kaldi ``--max-condition``).
    min_gaussian_occupancy : float or None
        Occupancy a component needs to be updated; ``None`` is Kaldi's default, 10 for
        diagonal and 100 for full models.
    min_gaussian_weight : float
    remove_low_count_gaussians : bool
    reg_covar : float
        Added to the diagonal of each covariance in the sklearn style.
    update_flags : str
        Kaldi's ``--update-flags``: which of means (``m``), variances (``v``) and weights
        (``w``) to update; ``a`` is all, ``t`` (transitions) is accepted and means nothing
        for a GMM. Kept in canonical order, ``"mvw"`` by default.
    """

    style: str = "kaldi"
    min_variance: float = 1e-3
    variance_floor: float = 1e-3
    max_condition: float = 1e4
    min_gaussian_occupancy: float | None = None
    min_gaussian_weight: float = 1e-5
    remove_low_count_gaussians: bool = True
    reg_covar: float = 1e-6
    update_flags: str = "mvw"

    def __post_init__(self) -> None:
        if self.style not in ("kaldi", "sklearn"):
            raise UserError(f"unknown M-step style {self.style!r}; use 'kaldi' or 'sklearn'")
        object.__setattr__(self, "update_flags", gmm_flags(self.update_flags))
        if self.style == "sklearn" and self.update_flags != "mvw":
            raise UserError("--update-flags needs the Kaldi M-step style")

    def min_occupancy(self, covariance_type: str) -> float:
        if self.min_gaussian_occupancy is not None:
            return self.min_gaussian_occupancy
        return 10.0 if covariance_type == "diag" else 100.0


GMM_FLAGS = "mvw"


def gmm_flags(text: str) -> str:
    """Kaldi's ``StringToGmmFlags`` as canonical letters: ``"wm"`` -> ``"mw"``, ``"a"`` ->
    ``"mvw"``; ``t`` (transitions) is accepted and dropped. Anything else is a UserError."""
    letters = set()
    for c in text:
        if c == "a":
            letters.update(GMM_FLAGS)
        elif c in GMM_FLAGS:
            letters.add(c)
        elif c != "t":
            raise UserError(f"--update-flags {text!r}: invalid letter {c!r}; use a subset of "
                            "m (means), v (variances), w (weights), or a (all)")
    return "".join(c for c in GMM_FLAGS if c in letters)


def augment_flags(text: str) -> str:
    """Kaldi's ``AugmentGmmFlags`` on :func:`gmm_flags`, for accumulators: variances need
    means, means need weights, and weights are always accumulated. ``t`` (or ``a``) stays,
    as Kaldi writes it (``"a"`` is ``"mvwt"``, flags 15)."""
    flags = set(gmm_flags(text)) | {"w"}
    if "v" in flags:
        flags.add("m")
    transitions = "t" if "t" in text or "a" in text else ""
    return "".join(c for c in GMM_FLAGS if c in flags) + transitions


@dataclass(frozen=True)
class UpdateReport:
    """What one M-step did to one model.

    Attributes
    ----------
    n_components_in, n_components_out : int
    floored_elements : int
        Variance elements (diag) or eigenvalues (full) raised to the floor.
    floored_gaussians : int
        Components with at least one floored element.
    removed : list of int
        Indices (in the input model) of the components removed for low count.
    not_updated : list of int
        Indices of starved components kept with their old parameters.
    """

    n_components_in: int
    n_components_out: int
    floored_elements: int = 0
    floored_gaussians: int = 0
    removed: list[int] = field(default_factory=list)
    not_updated: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, label: str, occupancy: float) -> str:
        """One log line: what the update did to model ``label`` (update logs, ``est``)."""
        return (f"model {label}: {self.n_components_in} -> {self.n_components_out} Gaussians, "
                f"occupancy {occupancy:.1f}, floored {self.floored_elements} elements in "
                f"{self.floored_gaussians} Gaussians, removed {self.removed}, kept starved "
                f"{self.not_updated}")


def m_step(
    stats: GmmStats, options: MStepOptions, previous: GMM | None = None
) -> tuple[GMM, UpdateReport]:
    """Estimate a GMM from statistics.

    Parameters
    ----------
    stats : GmmStats
        Statistics accumulated with ``previous`` (or hard assignments).
    options : MStepOptions
    previous : GMM, optional
        The model the statistics came from: starved components keep its parameters
        (Kaldi style). Without it, starved components are removed.

    Returns
    -------
    model : GMM
    report : UpdateReport
    """
    if options.style == "sklearn":
        return _sklearn_update(stats, options)
    return _kaldi_update(stats, options, previous)


def _sklearn_update(stats: GmmStats, options: MStepOptions) -> tuple[GMM, UpdateReport]:
    occ = stats.zeroth + 10.0 * np.finfo(np.float64).eps
    means = stats.first / occ[:, None]
    cov = _covariances(stats, occ, means)
    d = stats.dim
    if stats.covariance_type == "diag":
        cov += options.reg_covar
    else:
        cov[:, np.arange(d), np.arange(d)] += options.reg_covar
    model = GMM(occ / occ.sum(), means, cov, stats.covariance_type)
    return model, UpdateReport(stats.n_components, stats.n_components)


def _covariances(stats: GmmStats, occ: np.ndarray, means: np.ndarray,
                 about: np.ndarray | None = None) -> np.ndarray:
    """``second / occ - μ μᵀ`` (diag: ``second / occ - μ²``) with ``μ = means``, the
    statistics' own means; centred on other means ``about`` instead (Kaldi's variance-only
    update), plus ``(about - μ)(about - μ)ᵀ``."""
    if stats.covariance_type == "diag":
        cov = stats.second / occ[:, None] - means * means
        if about is not None:
            cov += (about - means) ** 2
        return cov
    cov = stats.second / occ[:, None, None] - means[:, :, None] * means[:, None, :]
    if about is not None:
        diff = about - means
        cov += diff[:, :, None] * diff[:, None, :]
    return 0.5 * (cov + cov.transpose(0, 2, 1))


def _kaldi_update(
    stats: GmmStats, options: MStepOptions, previous: GMM | None
) -> tuple[GMM, UpdateReport]:
    k = stats.n_components
    occ = stats.zeroth
    total = occ.sum()
    prob = occ / total if total > 0 else np.full(k, 1.0 / k)
    ok = (occ > options.min_occupancy(stats.covariance_type)) & (
        prob > options.min_gaussian_weight
    )
    safe_occ = np.where(ok, occ, 1.0)
    means = stats.first / safe_occ[:, None]
    flags = options.update_flags
    if flags != GMM_FLAGS and previous is None:
        raise UserError(f"--update-flags {flags}: updating only part of a model needs the "
                        "model the statistics came from")
    if "m" in flags:
        cov = _covariances(stats, safe_occ, means)
    else:  # variances about the old means, which stay
        cov = _covariances(stats, safe_occ, means, about=previous.means)
        means = previous.means.copy()
    floored_elements, floored_gauss = _apply_floor(cov, ok, stats.covariance_type, options)
    weights = prob.copy()
    if "v" not in flags:
        cov[ok] = previous.covariances[ok]
        floored_elements, floored_gauss = 0, 0
    if "w" not in flags:
        weights = previous.weights.copy()
    starved = np.flatnonzero(~ok)
    removed, kept = _starved_fate(starved, k, options, previous)
    for c in kept:  # a handful of starved components, not a per-Gaussian hot path
        means[c] = previous.means[c]
        cov[c] = previous.covariances[c]
        if "w" in flags:
            weights[c] = max(prob[c], options.min_gaussian_weight)
    keep = np.setdiff1d(np.arange(k), removed)
    if removed or "w" in flags:
        # weights not updated stay as they were, unless a removal renormalises them (Kaldi)
        weights = weights[keep] / weights[keep].sum()
    model = GMM(weights, means[keep], cov[keep], stats.covariance_type)
    report = UpdateReport(
        k, len(keep), floored_elements, floored_gauss, [int(c) for c in removed],
        [int(c) for c in kept],
    )
    return model, report


def _starved_fate(starved, k: int, options: MStepOptions, previous: GMM | None):
    """Split starved components into (removed, kept with old parameters)."""
    if previous is None or options.remove_low_count_gaussians:
        removed = list(starved[: k - 1]) if len(starved) else []
        kept = [c for c in starved if c not in removed]
        if kept and previous is None:
            raise UserError(
                "no Gaussian has enough occupancy to be estimated; lower "
                "--min-gaussian-occupancy or use fewer Gaussians"
            )
        return removed, kept
    return [], list(starved)


def _apply_floor(cov: np.ndarray, ok: np.ndarray, cov_type: str, options: MStepOptions):
    """Floor the updated covariances in place; return (elements floored, Gaussians floored)."""
    if cov_type == "diag":
        low = (cov < options.min_variance) & ok[:, None]
        cov[low] = options.min_variance
        return int(low.sum()), int(low.any(axis=1).sum())
    eigval, eigvec = np.linalg.eigh(cov[ok])
    floor = np.maximum(options.variance_floor, eigval.max(axis=1) / options.max_condition)
    low = eigval < floor[:, None]
    eigval = np.maximum(eigval, floor[:, None])
    fixed = np.einsum("kij,kj,klj->kil", eigvec, eigval, eigvec)
    rows = np.flatnonzero(ok)[low.any(axis=1)]
    cov[rows] = fixed[low.any(axis=1)]
    return int(low.sum()), int(len(rows))
