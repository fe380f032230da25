"""Initialisation: greedy k-means++ seeds and Kaldi's mix-up split."""

from __future__ import annotations

import numpy as np
from helpers import KALDI_MODELS
from kaldi_text import read_gmm

from emdist.models.gmm import GMM
from emdist.models.initialize import kmeans_plus_plus, label_rng, split


def _clusters(rng, k=8, dim=39, n=40_000):
    """Well separated clusters of very unequal sizes (the smallest holds ~1 % of frames)."""
    means = rng.normal(0.0, 6.0, (k, dim))
    weights = np.linspace(1.0, 12.0, k)
    weights /= weights.sum()
    labels = rng.choice(k, size=n, p=weights)
    frames = means[labels] + rng.normal(0.0, 1.2, (n, dim))
    return frames, means


def _covers_every_cluster(centres, means) -> bool:
    nearest = ((centres[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)
    return sorted(nearest) == list(range(len(means)))


def test_kmeans_plus_plus_covers_clusters_at_least_as_often_as_scikit_learn():
    """Greedy D² seeding on 39-dim clusters of unequal size: the share of runs that put
    one seed in every cluster is at least scikit-learn's ``kmeans_plusplus`` on the same
    data sets (plain D² sampling misses the small clusters far more often)."""
    from sklearn.cluster import kmeans_plusplus

    ours = theirs = 0
    for seed in range(30):
        frames, means = _clusters(np.random.default_rng(100 + seed), n=20_000)
        centres = kmeans_plus_plus(frames, len(means), label_rng(seed, "g", "kmeans++"))
        assert all((frames == c).all(axis=1).any() for c in centres)  # seeds are frames
        ours += _covers_every_cluster(centres, means)
        reference, _ = kmeans_plusplus(frames, len(means), random_state=seed)
        theirs += _covers_every_cluster(reference, means)
    assert ours >= theirs
    assert ours >= 20


def test_kmeans_plus_plus_depends_only_on_the_seed():
    frames, _ = _clusters(np.random.default_rng(0), n=5_000)
    a = kmeans_plus_plus(frames, 8, label_rng(3, "w", "kmeans++"))
    b = kmeans_plus_plus(frames, 8, label_rng(3, "w", "kmeans++"))
    c = kmeans_plus_plus(frames, 8, label_rng(4, "w", "kmeans++"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_kmeans_plus_plus_with_fewer_distinct_frames_than_seeds():
    frames = np.repeat(np.eye(3), 10, axis=0)
    centres = kmeans_plus_plus(frames, 5, np.random.default_rng(0))
    assert centres.shape == (5, 3)
    assert {tuple(c) for c in centres} == {tuple(r) for r in np.eye(3)}


def test_split_halves_the_heaviest_and_perturbs_by_sigma():
    var = np.array([4.0, 1.0, 9.0])
    gmm = GMM(np.array([0.7, 0.3]), np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]),
              np.array([var, var]), "diag")
    out = split(gmm, 3, 0.5, np.random.default_rng(0))
    r = np.random.default_rng(0).standard_normal(3)  # the draw split makes
    np.testing.assert_allclose(out.weights, [0.35, 0.3, 0.35])
    np.testing.assert_allclose(out.means[2], gmm.means[0] + 0.5 * np.sqrt(var) * r)
    np.testing.assert_allclose(out.means[0], gmm.means[0] - 0.5 * np.sqrt(var) * r)
    assert np.all(out.covariances == var)
    # splitting on: the heaviest is taken again (ties go to the first)
    out4 = split(gmm, 4, 0.5, np.random.default_rng(0))
    np.testing.assert_allclose(sorted(out4.weights), [0.175, 0.175, 0.3, 0.35])


def test_split_of_full_covariance_copies_the_matrix():
    cov = np.array([[[2.0, 0.5], [0.5, 1.0]]])
    gmm = GMM(np.array([1.0]), np.array([[1.0, -1.0]]), cov, "full")
    out = split(gmm, 3, 0.1, np.random.default_rng(1))
    assert out.n_components == 3
    assert np.all(out.covariances == cov[0])


def test_split_matches_kaldi_mix_up():
    """``gmm-global-est --mix-up=12 --perturb-factor=0`` after the default update."""
    est = read_gmm(KALDI_MODELS / "est.default.kaldi.txt")
    kaldi = read_gmm(KALDI_MODELS / "est.mixup12.kaldi.txt")
    gmm = GMM(est.weights / est.weights.sum(), est.means, est.covariances, "diag")
    ours = split(gmm, 12, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(ours.weights, kaldi.weights, rtol=1e-5)
    np.testing.assert_allclose(ours.means, kaldi.means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, kaldi.covariances, rtol=1e-5)
