"""Initial models: k-means++ seeds for Lloyd iterations, and Kaldi-style mix-up splits.

The iterations themselves (Lloyd's hard assignments, EM between splits) are passes of the
engine over the data; this module holds the pure pieces they start from.
"""

from __future__ import annotations

import zlib

import numpy as np

from emdist.errors import UserError
from emdist.models.gmm import GMM


def label_rng(seed: int, label: str, purpose: str) -> np.random.Generator:
    """A random generator that depends only on ``seed``, the model's label and the purpose."""
    key = zlib.crc32(f"{purpose}:{label}".encode())
    return np.random.default_rng([int(seed), key])


def kmeans_plus_plus(frames: np.ndarray, n_components: int, rng: np.random.Generator,
                     n_local_trials: int | None = None):
    """Choose ``n_components`` seeds among ``frames`` by greedy k-means++.

    Each new seed is the best of ``n_local_trials`` candidates drawn with probability
    proportional to the squared distance to the nearest seed so far (D² sampling), "best"
    meaning the one that lowers the total squared distance most (Arthur & Vassilvitskii;
    scikit-learn's default, with ``2 + log K`` trials). Plain D² sampling misses small
    clusters when the spread inside clusters is not negligible beside the distances
    between them, as with 39-dim features.

    Parameters
    ----------
    frames : ndarray of shape (N, D)
    n_components : int
    rng : numpy.random.Generator
    n_local_trials : int, optional

    Returns
    -------
    ndarray of shape (n_components, D), float64
    """
    x = np.asarray(frames, dtype=np.float64)
    n = len(x)
    if n < n_components:
        raise UserError(f"{n} frames cannot seed {n_components} Gaussians; use fewer Gaussians")
    trials = n_local_trials or 2 + int(np.log(n_components))
    sq_norm = np.einsum("ij,ij->i", x, x)
    centres = np.empty((n_components, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = _sq_dist(x, sq_norm, centres[:1])[0]
    for k in range(1, n_components):  # K steps of O(trials·N·D): the seeding, not EM
        total = closest.sum()
        if total <= 0:  # fewer distinct frames than Gaussians
            candidates = rng.integers(n, size=trials)
        else:
            cum = np.cumsum(closest)
            candidates = np.minimum(np.searchsorted(cum, rng.random(trials) * total), n - 1)
        dist = np.minimum(closest, _sq_dist(x, sq_norm, x[candidates]))
        best = int(np.argmin(dist.sum(axis=1)))
        centres[k] = x[candidates[best]]
        closest = dist[best]
    return centres


def _sq_dist(x: np.ndarray, sq_norm: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances of every frame to each centre, shape (C, N)."""
    cross = centres @ x.T
    out = sq_norm[None, :] - 2.0 * cross + np.einsum("ij,ij->i", centres, centres)[:, None]
    return np.maximum(out, 0.0)


def centres_model(centres: np.ndarray, covariance_type: str) -> GMM:
    """The GMM whose hard assignments are nearest-centre (k-means) assignments.

    Equal weights and identity covariances: ``log N(x; μ_k, I) = c - ½‖x - μ_k‖²``.
    """
    k, d = centres.shape
    cov = np.ones((k, d)) if covariance_type == "diag" else np.broadcast_to(np.eye(d), (k, d, d))
    return GMM(np.full(k, 1.0 / k), centres, cov, covariance_type)


def split(model: GMM, target: int, perturb_factor: float, rng: np.random.Generator) -> GMM:
    """Kaldi's ``DiagGmm::Split``: split the heaviest Gaussian until there are ``target``.

    The heaviest component's weight is halved and shared with a copy; the two means move
    by ``±perturb_factor · σ ⊙ r`` with ``r ~ N(0, I)`` (σ the per-dimension standard
    deviations); the covariance is copied.
    """
    weights = list(model.weights)
    means = list(model.means)
    covs = list(model.covariances)
    std = list(np.sqrt(model.variances()))
    while len(weights) < target:
        heaviest = int(np.argmax(weights))
        weights[heaviest] /= 2.0
        offset = perturb_factor * std[heaviest] * rng.standard_normal(model.dim)
        base = means[heaviest]
        weights.append(weights[heaviest])
        means.append(base + offset)
        means[heaviest] = base - offset
        covs.append(covs[heaviest])
        std.append(std[heaviest])
    return GMM(np.array(weights), np.array(means), np.array(covs), model.covariance_type)
