"""scikit-learn-style estimators over emdist's engine: :class:`GaussianMixture` (one GMM, on
an array or a Kaldi data dir) and :class:`WordRecognizer` (one model per word of a data dir).

They run the engine of ``emdist train`` (its initialisation, E-step, M-step, tree sum and
convergence test), in this process by default, or on a Dask cluster when a
``distributed.Client`` is passed as ``client``; where the work runs never changes the
result. scikit-learn is not needed: the estimators follow its conventions by themselves
(``get_params``/``set_params`` from the ``__init__`` signature, fitted attributes ending in
``_``, ``ValueError`` for bad input), and pass ``sklearn.utils.estimator_checks`` where
scikit-learn is installed.

>>> import numpy as np
>>> import emdist
>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(-4.0, 1.0, (300, 2)), rng.normal(4.0, 1.0, (300, 2))])
>>> gm = emdist.GaussianMixture(n_components=2, covariance_type="diag", random_state=0).fit(X)
>>> gm.converged_, gm.n_features_in_, gm.means_.shape
(True, 2, (2, 2))
>>> np.round(np.sort(gm.means_[:, 0]))
array([-4.,  4.])
>>> labels = gm.predict([[-4.0, -4.0], [4.0, 4.0]])
>>> bool(labels[0] != labels[1])
True
>>> float(gm.predict_proba([[-4.0, -4.0]]).sum().round(6))
1.0
>>> gm.score(X) > -4.0
True

How an array reaches the engine: it is cut into ``nj`` contiguous blocks of frames (the
engine's shards, as ``--nj`` cuts a data dir), and each block becomes the engine's own
in-memory shard, a :class:`emdist.tasks.LoadedShard`, exactly what the trainer caches after
reading a shard from disk (``--feature-cache memory``). In process the shards are plain
arrays (views of ``X``, no copy beyond the column-major one the E-step wants); on a Dask
client they are scattered to the workers once per fit, so no worker ever needs a file.
No temporary Kaldi data dir is written.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from emdist.backends.serial import SerialBackend
from emdist.data.datadir import DataDir, Utterance, load_data_dir, parse_rxfilename
from emdist.engine.config import TrainConfig
from emdist.engine.driver import train
from emdist.errors import UserError
from emdist.io.modelio import save_models
from emdist.models.estep import EStepOptions
from emdist.models.gmm import GMM
from emdist.models.kernel import Kernel, expand_features
from emdist.models.mstep import MStepOptions
from emdist.recognizer import decide, evaluate, score
from emdist.tasks import GLOBAL_LABEL, MAX_ABS_FEATURE, LoadedShard

__all__ = ["ConvergenceWarning", "GaussianMixture", "NotFittedError", "WordRecognizer"]

_ARRAY_PATH = "<in-memory array>"
"""The pseudo ark of an array's blocks: ``<in-memory array>:START`` (never opened)."""
_SCORE_CHUNK = 4096


# -- scikit-learn's conventions, without scikit-learn -------------------------------------


class NotFittedError(ValueError, AttributeError):
    """A method that needs a fitted estimator was called before ``fit`` (scikit-learn's
    ``NotFittedError`` is raised instead where scikit-learn is installed)."""


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before converging (scikit-learn's ``ConvergenceWarning``
    is issued instead where scikit-learn is installed)."""


def _sklearn_class(module: str, name: str, fallback: type) -> type:
    """scikit-learn's class where scikit-learn can be imported (late, never at import
    time), so that its own tools recognise it; else emdist's equivalent."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return fallback


def _not_fitted(estimator) -> Exception:
    cls = _sklearn_class("sklearn.exceptions", "NotFittedError", NotFittedError)
    return cls(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
               "appropriate arguments before using this estimator.")


def _check_random_state(seed) -> np.random.RandomState:
    """scikit-learn's ``check_random_state``."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return np.random.RandomState(int(seed))
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"{seed!r} cannot be used to seed a numpy.random.RandomState instance")


def _seeds(random_state, n: int) -> list[int]:
    """emdist seeds (``--seed``) of ``n`` initialisations: an int ``random_state`` is the
    first one itself (``random_state=S`` is ``emdist train --seed S``), the others are
    drawn from it; None or a RandomState draws them all."""
    rng = _check_random_state(random_state)
    first = ([int(random_state)] if isinstance(random_state, numbers.Integral)
             and not isinstance(random_state, bool) else [])
    if first and first[0] < 0:
        raise ValueError(f"random_state must be non-negative, got {random_state}")
    return (first + [int(rng.randint(np.iinfo(np.int32).max)) for _ in range(n)])[:n]


class _Estimator:
    """``get_params``/``set_params``/``repr``/``clone`` as ``sklearn.base.BaseEstimator``
    gives them: parameters are the keyword arguments of ``__init__``, stored unchanged."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values()
                      if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params):
        valid = self._get_param_names()
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {self}. Valid "
                                 f"parameters are: {valid!r}.")
            if sub:
                getattr(self, name).set_params(**{sub: value})
            else:
                setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in
                    inspect.signature(type(self).__init__).parameters.values()}
        shown = []
        for name in self._get_param_names():
            value = getattr(self, name)
            default = defaults.get(name, inspect.Parameter.empty)
            same = value is default or (type(value) is type(default) and _equal(value, default))
            if not same:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_clone__(self):
        """An unfitted copy with the same parameters; the Dask client is shared, not
        copied (it is a connection)."""
        params = {name: value if name == "client" else copy.deepcopy(value)
                  for name, value in self.get_params(deep=False).items()}
        return type(self)(**params)

    def __getstate__(self) -> dict:
        """Pickled without the client: a connection to a cluster does not travel."""
        state = dict(self.__dict__)
        if state.get("client") is not None:
            state["client"] = None
        return state

    def _backend(self):
        """Where the shard tasks run: this process, or the cluster of ``client``."""
        if self.client is None:
            return SerialBackend()
        from distributed import Client

        from emdist.backends.dask_backend import DaskBackend

        if not isinstance(self.client, Client):
            raise ValueError(f"client must be a distributed.Client or None, got "
                             f"{type(self.client).__name__}")
        return DaskBackend(self.client)  # never closed here: the client is the caller's


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


def _is_path(X) -> bool:
    return isinstance(X, (str, os.PathLike))


def _check_array(X, estimator, *, reset: bool, min_samples: int = 1) -> np.ndarray:
    """scikit-learn's ``validate_data`` for frames: a 2-D finite float array (float32 and
    float64 kept, anything numeric converted to float64), at least ``min_samples`` rows and
    one column; ``n_features_in_`` set (``reset``) or checked."""
    name = type(estimator).__name__
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(f"Sparse data was passed for X, but dense data is required by {name}; "
                        "use X.toarray() to convert to a dense numpy array.")
    if hasattr(X, "columns") and hasattr(X, "dtypes"):  # a data frame: no feature names
        X = np.asarray(X)
    dtype = getattr(X, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.complexfloating):
        raise ValueError("Complex data not supported\n" + str(X))
    arr = np.asarray(X)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError("Complex data not supported\n" + str(X))
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim == 0:
        raise ValueError(f"Expected 2D array, got scalar array instead:\narray={arr}.\n"
                         "Reshape your data either using array.reshape(-1, 1) if your data "
                         "has a single feature or array.reshape(1, -1) if it contains a "
                         "single sample.")
    if arr.ndim == 1:
        raise ValueError(f"Expected 2D array, got 1D array instead:\narray={arr}.\n"
                         "Reshape your data either using array.reshape(-1, 1) if your data "
                         "has a single feature or array.reshape(1, -1) if it contains a "
                         "single sample.")
    if arr.ndim > 2:
        raise ValueError(f"Found array with dim {arr.ndim}, while dim <= 2 is required by "
                         f"{name}.")
    n, d = arr.shape
    if n < min_samples:
        raise ValueError(f"Found array with {n} sample(s) (shape={arr.shape}) while a "
                         f"minimum of {min_samples} is required by {name}.")
    if d < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape={arr.shape}) while a minimum "
                         f"of 1 is required by {name}.")
    finite = np.isfinite(arr)
    if not finite.all():
        what = "NaN" if np.isnan(arr).any() else "infinity"
        raise ValueError(f"Input X contains {what}. {name} does not accept missing values "
                         "(NaN) or infinite values (inf).")
    if np.abs(arr).max() > MAX_ABS_FEATURE:
        raise ValueError(f"Input X has values of magnitude beyond {MAX_ABS_FEATURE:.0e}; "
                         "scale the data")
    if reset:
        estimator.n_features_in_ = d
    elif d != estimator.n_features_in_:
        raise ValueError(f"X has {d} features, but {name} is expecting "
                         f"{estimator.n_features_in_} features as input.")
    return arr


# -- arrays as the engine's in-memory shards ----------------------------------------------


def _array_data(X: np.ndarray, nj: int) -> DataDir:
    """A data dir standing for ``X``: at most ``nj`` utterances, contiguous blocks of about
    equal size (so ``make_shards`` gives one shard per block), each named by its first row."""
    n = len(X)
    bounds = np.linspace(0, n, min(nj, n) + 1).round().astype(int)
    utts = tuple(Utterance(f"rows-{a:012d}", f"{_ARRAY_PATH}:{a}", None, int(b - a))
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return DataDir(Path(_ARRAY_PATH), utts, X.shape[1], False, None)


class _ArrayBackend:
    """A backend whose cached shards are blocks of an array held by this process (the
    engine's :class:`LoadedShard` values), placed where ``inner`` runs tasks: kept here for
    the serial backend, scattered once to the workers of a Dask backend. Everything else is
    the inner backend's."""

    def __init__(self, inner, frames: np.ndarray) -> None:
        self.inner = inner
        self.frames = frames
        self.name = inner.name

    def _loaded(self, shard) -> LoadedShard:
        blocks = []
        for utt in shard.utts:
            start = parse_rxfilename(utt.rxfilename)[1]
            blocks.append(self.frames[start : start + utt.num_frames])
        frames = np.asfortranarray(np.concatenate(blocks) if len(blocks) > 1 else blocks[0])
        lengths = tuple(u.num_frames for u in shard.utts)
        return LoadedShard(shard, {GLOBAL_LABEL: frames}, {GLOBAL_LABEL: lengths})

    def cache(self, shards: Sequence) -> list:
        loaded = [self._loaded(s) for s in shards]
        client = getattr(self.inner, "client", None)
        if client is None:
            return loaded
        return client.scatter(loaded, hash=False)

    def check_paths(self, paths) -> None:
        """Nothing to read: the frames come from memory."""

    def memory_capacity(self) -> int:
        return self.inner.memory_capacity()

    def __getattr__(self, name: str):  # keep, rebalance, map, map_reduce, describe, ...
        return getattr(self.inner, name)


def _run_engine(data: DataDir, config: TrainConfig, backend, feature_cache: str,
                initial: dict | None = None, prior: Sequence[float] = ()):
    """Train with the engine of ``emdist train``; returns (models, the log-likelihood per
    frame of every iteration). From ``initial`` models (weights_init, warm start), the
    engine's iterations run from them, with ``prior`` as the convergence history."""
    history: list[float] = []

    def record(rec) -> None:
        history.append(rec.loglike_per_frame)

    models = train(data, config, backend, on_record=record, feature_cache=feature_cache,
                   initial=initial, history=prior)
    return models, history


# -- GaussianMixture ----------------------------------------------------------------------


class GaussianMixture(_Estimator):
    """A Gaussian mixture trained by emdist's EM, with scikit-learn's interface.

    The parameters and fitted attributes are those of ``sklearn.mixture.GaussianMixture``
    (same names, defaults and meaning) where emdist supports them; with
    ``mstep_style="sklearn"`` (the default) and the same starting parameters, the fit is
    scikit-learn's to float64 rounding. ``fit`` takes an array of frames (float32, as Kaldi
    features, or float64; other numbers become float64) or the path of a Kaldi data dir,
    whose frames all train one model exactly as ``emdist train --global`` does.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {"full", "diag"}, default="full"
        scikit-learn's ``"tied"`` and ``"spherical"`` are not supported (``ValueError`` at
        fit).
    tol : float, default=1e-3
        EM stops when the mean per-frame log-likelihood changes by less than ``tol``
        (``emdist train --tol``).
    reg_covar : float, default=1e-6
        Added to the covariances' diagonal by the scikit-learn M-step; the Kaldi M-step
        floors variances instead (``--min-variance`` etc., at the CLI's defaults).
    max_iter : int, default=100
        EM iterations at most (``--num-iters``).
    n_init : int, default=1
        Initialisations; the one with the highest final lower bound is kept.
    init_params : {"kmeans", "mixup"}, default="kmeans"
        ``"kmeans"``: emdist's k-means++ seeding and 10 Lloyd passes, then one M-step
        (``--init kmeans``); ``"mixup"``: Kaldi-style mix-up from one Gaussian, splitting
        the heaviest with two EM passes after each doubling (``--init mixup``).
        scikit-learn's ``"k-means++"``, ``"random"`` and ``"random_from_data"`` are not
        supported (``ValueError`` at fit).
    weights_init : array of shape (n_components,), optional
    means_init : array of shape (n_components, n_features), optional
    precisions_init : array, optional
        Shape (n_components, n_features) for ``"diag"``, (n_components, n_features,
        n_features) for ``"full"``. When all three are given EM starts from them; when only
        some are, they replace those parts of the model ``init_params`` makes.
    random_state : int, RandomState instance or None, default=None
        An int S is ``emdist train --seed S`` (for the first initialisation); None draws
        the seeds from numpy's global generator. Also seeds :meth:`sample`.
    warm_start : bool, default=False
        Refit from the current parameters (one initialisation), as scikit-learn does.
    verbose : int, default=0
    verbose_interval : int, default=10
    mstep_style : {"sklearn", "kaldi"}, default="sklearn"
        scikit-learn's update (``reg_covar``, nothing removed) or Kaldi's (variance floors;
        Gaussians with too little occupancy are removed, so the fitted model may have fewer
        than ``n_components``), as ``emdist train --mstep-style``.
    precision : {"float64", "float32"}, default="float64"
        Precision of the E-step's products (``--precision``; the CLI's default is
        float32, the fast path). Statistics are float64 either way.
    client : distributed.Client, optional
        Run the shard tasks on this Dask cluster (the same bits as in process).
    nj : int, default=8
        Shards (Kaldi's jobs, ``--nj``): the frames are cut into this many blocks; the
        result depends on it (chunks of the E-step are cut per shard), never on the
        workers.

    Attributes
    ----------
    weights_, means_, covariances_ : ndarray
    precisions_, precisions_cholesky_ : ndarray
        scikit-learn's conventions: the inverse covariances, and their upper-triangular
        factors ``U`` with ``U @ U.T`` the precision (diag: ``1 / sqrt(covariances_)``).
    converged_ : bool
    n_iter_ : int
        EM iterations run by the best initialisation.
    lower_bound_ : float
        Mean per-frame log-likelihood at the last iteration (of the model that iteration
        started from, as scikit-learn's EM reports it).
    lower_bounds_ : list of float
        The same at every iteration.
    n_features_in_ : int
    model_ : emdist.GMM
        The fitted model as emdist's value (``emdist.save_models({"global": gm.model_})``
        writes the file ``emdist train --global`` writes).
    """

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None,
                 means_init=None, precisions_init=None, random_state=None, warm_start=False,
                 verbose=0, verbose_interval=10, mstep_style="sklearn", precision="float64",
                 client=None, nj=8):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.mstep_style = mstep_style
        self.precision = precision
        self.client = client
        self.nj = nj

    def __sklearn_tags__(self):
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="density_estimator", target_tags=TargetTags(required=False),
                    transformer_tags=None, regressor_tags=None, classifier_tags=None)

    # -- parameters -------------------------------------------------------------------

    def _check_parameters(self) -> None:
        def integer(name, low):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
                    or value < low):
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be an "
                                 f"int in the range [{low}, inf). Got {value!r} instead.")

        def real(name):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not value >= 0 or not np.isfinite(value)):
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be a "
                                 f"float in the range [0.0, inf). Got {value!r} instead.")

        def choice(name, options, unsupported=()):
            value = getattr(self, name)
            if value in unsupported:
                raise ValueError(f"{type(self).__name__}: {name}={value!r} is scikit-learn's, "
                                 f"not supported by emdist; use one of {options}")
            if value not in options:
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be one "
                                 f"of {options}. Got {value!r} instead.")

        integer("n_components", 1)
        integer("max_iter", 0)
        integer("n_init", 1)
        integer("nj", 1)
        integer("verbose_interval", 1)
        real("tol")
        real("reg_covar")
        choice("covariance_type", ("full", "diag"), ("tied", "spherical"))
        choice("init_params", ("kmeans", "mixup"), ("k-means++", "random", "random_from_data"))
        choice("mstep_style", ("sklearn", "kaldi"))
        choice("precision", ("float64", "float32"))

    def _initial_parts(self, d: int) -> dict[str, np.ndarray]:
        """The checked ``weights_init``, ``means_init`` and ``precisions_init`` given."""
        k, cov = self.n_components, self.covariance_type
        parts = {}
        if self.weights_init is not None:
            w = np.array(self.weights_init, dtype=np.float64)
            if w.shape != (k,):
                raise ValueError(f"The parameter 'weights' should have the shape of ({k},), "
                                 f"but got {w.shape}")
            if w.min() < 0.0 or w.max() > 1.0:
                raise ValueError("The parameter 'weights' should be in the range [0, 1], but "
                                 f"got max value {w.max():.5f}, min value {w.min():.5f}")
            if not np.allclose(np.abs(1.0 - w.sum()), 0.0):
                raise ValueError("The parameter 'weights' should be normalized, but got "
                                 f"sum(weights) = {w.sum():.5f}")
            parts["weights"] = w
        if self.means_init is not None:
            m = np.array(self.means_init, dtype=np.float64)
            if m.shape != (k, d):
                raise ValueError(f"The parameter 'means' should have the shape of {(k, d)}, "
                                 f"but got {m.shape}")
            parts["means"] = m
        if self.precisions_init is not None:
            p = np.array(self.precisions_init, dtype=np.float64)
            want = (k, d) if cov == "diag" else (k, d, d)
            if p.shape != want:
                raise ValueError(f"The parameter '{cov} precision' should have the shape of "
                                 f"{want}, but got {p.shape}")
            if cov == "diag":
                if np.any(p <= 0.0):
                    raise ValueError("'diag precision' should be positive")
                parts["covariances"] = 1.0 / p
            else:
                if not np.allclose(p, p.transpose(0, 2, 1)) or np.any(
                        np.linalg.eigvalsh(p) <= 0.0):
                    raise ValueError("'full precision' should be symmetric, positive-definite")
                parts["covariances"] = np.linalg.inv(p)
        return parts

    def _config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            model="gmm", num_gauss=int(self.n_components), covariance_type=self.covariance_type,
            num_iters=int(self.max_iter), init=self.init_params, nj=int(self.nj),
            global_mode=True, seed=seed, tol=float(self.tol),
            estep=EStepOptions(dtype=self.precision),
            mstep=MStepOptions(style=self.mstep_style, reg_covar=float(self.reg_covar)),
        )

    # -- fitting ------------------------------------------------------------------------

    def fit(self, X, y=None):
        """Estimate the mixture by EM from frames ``X`` (n_samples, n_features), or from
        every frame of the Kaldi data dir at path ``X`` (``emdist train --global``).

        Returns
        -------
        self
        """
        self._check_parameters()
        if _is_path(X):
            data = load_data_dir(X, require_labels=False)
            self.n_features_in_ = data.dim
            backend, cache = self._backend(), "auto"
            n = data.num_frames
            if n < self.n_components:
                raise ValueError(f"Expected n_samples >= n_components but got n_components = "
                                 f"{self.n_components}, n_samples = {n}")
        else:
            frames = _check_array(X, self, reset=True, min_samples=1)
            if len(frames) < self.n_components:
                raise ValueError(f"Expected n_samples >= n_components but got n_components = "
                                 f"{self.n_components}, n_samples = {len(frames)}")
            data = _array_data(frames, int(self.nj))
            backend, cache = _ArrayBackend(self._backend(), frames), "memory"
        parts = self._initial_parts(data.dim)
        warm = self.warm_start and hasattr(self, "converged_")
        n_init = 1 if warm else int(self.n_init)
        seeds = _seeds(self.random_state, n_init)
        best, best_bound = None, -np.inf
        try:
            for i, seed in enumerate(seeds):
                result = self._one_init(data, backend, cache, seed, parts, warm, i)
                bound = result[1][-1] if result[1] else -np.inf
                if best is None or bound > best_bound:  # the first of equals, as sklearn
                    best, best_bound = result, bound
        except UserError as exc:
            if _is_path(X):
                raise
            raise ValueError(str(exc)) from exc
        model, history, converged = best
        if not converged and self.max_iter > 0:
            cls = _sklearn_class("sklearn.exceptions", "ConvergenceWarning", ConvergenceWarning)
            warnings.warn("Best performing initialization did not converge. Try different init "
                          "parameters, or increase max_iter, tol, or check for degenerate "
                          "data.", cls, stacklevel=2)
        self._set_model(model)
        self.converged_ = bool(converged)
        self.n_iter_ = len(history)
        self.lower_bounds_ = list(history)
        self.lower_bound_ = history[-1] if history else (
            self.lower_bound_ if warm else -np.inf)
        return self

    def _one_init(self, data, backend, cache, seed, parts, warm, i):
        config = self._config(seed)
        if self.verbose:
            print(f"Initialization {i}")
        t0 = time.time()
        initial, prior = None, []
        if warm:
            initial, prior = {GLOBAL_LABEL: self.model_}, [self.lower_bound_]
        elif parts:
            if len(parts) == 3:
                start = None
            else:  # the initialisation's model, with the given parts in place of its own
                start = _run_engine(data, replace(config, num_iters=0), backend,
                                    cache)[0][GLOBAL_LABEL]
                if start.n_components != self.n_components:
                    raise ValueError("the initialisation lost Gaussians (Kaldi M-step): give "
                                     "weights_init, means_init and precisions_init together")
            get = parts.get
            initial = {GLOBAL_LABEL: GMM(
                get("weights", start.weights if start else None),
                get("means", start.means if start else None),
                get("covariances", start.covariances if start else None),
                self.covariance_type)}
        models, history = _run_engine(data, config, backend, cache, initial, prior)
        whole = prior + history
        converged = len(whole) >= 2 and abs(whole[-1] - whole[-2]) < self.tol
        if self.verbose:
            for n, value in enumerate(history, start=1):
                if n % self.verbose_interval == 0 or self.verbose >= 2:
                    print(f"  Iteration {n}\t lower bound {value:.5f}")
            state = "converged" if converged else "did not converge"
            print(f"Initialization {state}. time lapse {time.time() - t0:.5f}s\t lower bound "
                  f"{history[-1] if history else -np.inf:.5f}")
        return models[GLOBAL_LABEL], history, converged

    def _set_model(self, model: GMM) -> None:
        self.model_ = model
        self.weights_ = np.array(model.weights)
        self.means_ = np.array(model.means)
        self.covariances_ = np.array(model.covariances)
        if model.covariance_type == "diag":
            self.precisions_cholesky_ = 1.0 / np.sqrt(self.covariances_)
            self.precisions_ = self.precisions_cholesky_**2
        else:
            d = model.dim
            chol = np.empty_like(self.covariances_)
            for k, cov in enumerate(self.covariances_):
                lower = np.linalg.cholesky(cov)
                # U = L⁻ᵀ, upper triangular (exact zeros below), U Uᵀ = Σ⁻¹
                chol[k] = np.triu(np.linalg.solve(lower, np.eye(d)).T)
            self.precisions_cholesky_ = chol
            self.precisions_ = np.matmul(chol, chol.transpose(0, 2, 1))

    def fit_predict(self, X, y=None):
        """``fit(X).predict(X)``."""
        return self.fit(X).predict(X)

    # -- using the model ----------------------------------------------------------------

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "weights_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise _not_fitted(self)

    def _model(self) -> GMM:
        """The model of the fitted attributes (changing them changes the predictions)."""
        return GMM(self.weights_, self.means_, self.covariances_, self.model_.covariance_type)

    def _weighted_log_prob(self, X) -> np.ndarray:
        """``log w_k + log N(x; μ_k, Σ_k)``, (n_samples, n_components), float64: the
        kernel's natural parameters on frames centred on the mixture's mean."""
        self._check_fitted()
        frames = _check_array(X, self, reset=False)
        model = self._model()
        shift = model.weights @ model.means
        kernel = Kernel.from_gmm(model, np.float64, shift=shift)
        out = np.empty((len(frames), model.n_components))
        for a in range(0, len(frames), _SCORE_CHUNK):
            chunk = np.asarray(frames[a : a + _SCORE_CHUNK], dtype=np.float64) - shift
            kernel.component_log_likelihood(expand_features(chunk, model.covariance_type),
                                            out=out[a : a + len(chunk)])
        return out

    @staticmethod
    def _logsumexp(a: np.ndarray) -> np.ndarray:
        top = a.max(axis=1)
        with np.errstate(under="ignore"):
            return top + np.log(np.exp(a - top[:, None]).sum(axis=1))

    def score_samples(self, X) -> np.ndarray:
        """Log-likelihood ``log p(x)`` of each sample, shape (n_samples,)."""
        return self._logsumexp(self._weighted_log_prob(X))

    def score(self, X, y=None) -> float:
        """Mean per-sample log-likelihood of ``X``."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X) -> np.ndarray:
        """Posterior of each component given each sample, (n_samples, n_components)."""
        log_prob = self._weighted_log_prob(X)
        with np.errstate(under="ignore"):
            return np.exp(log_prob - self._logsumexp(log_prob)[:, None])

    def predict(self, X) -> np.ndarray:
        """The most probable component of each sample."""
        return self._weighted_log_prob(X).argmax(axis=1)

    def _n_parameters(self) -> int:
        k, d = self.means_.shape
        cov = k * d if self.covariance_type == "diag" else k * d * (d + 1) // 2
        return int(cov + k * d + k - 1)

    def bic(self, X) -> float:
        """Bayesian information criterion of the model on ``X`` (lower is better)."""
        n = len(_check_array(X, self, reset=False))
        return -2.0 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion of the model on ``X`` (lower is better)."""
        n = len(_check_array(X, self, reset=False))
        return -2.0 * self.score(X) * n + 2 * self._n_parameters()

    def sample(self, n_samples=1):
        """Draw samples from the fitted mixture: (X, y), y the component of each."""
        self._check_fitted()
        if n_samples < 1:
            raise ValueError(f"Invalid value for 'n_samples': {n_samples} . The sampling "
                             "requires at least one sample.")
        rng = _check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_)
        d = self.means_.shape[1]
        if self.model_.covariance_type == "full":
            X = np.vstack([rng.multivariate_normal(mean, cov, int(c)) for mean, cov, c in
                           zip(self.means_, self.covariances_, counts, strict=True)])
        else:
            X = np.vstack([mean + rng.standard_normal(size=(c, d)) * np.sqrt(cov) for mean, cov,
                           c in zip(self.means_, self.covariances_, counts, strict=True)])
        y = np.concatenate([np.full(c, j, dtype=int) for j, c in enumerate(counts)])
        return X, y


# -- WordRecognizer -----------------------------------------------------------------------


class WordRecognizer(_Estimator):
    """Isolated-word recognition with one model per word, as ``emdist train`` and
    ``emdist test`` do it, on Kaldi data dirs.

    ``fit(DATA_DIR)`` trains one model per label of ``DATA_DIR/text`` (exactly
    ``emdist train DATA_DIR``); ``predict(DATA_DIR)`` gives each utterance's best word, in
    ``feats.scp`` order; ``score(DATA_DIR)`` the accuracy against its ``text`` (higher is
    better, scikit-learn's convention; ``emdist test`` prints the error rate).

    Parameters
    ----------
    model : {"gmm", "hmm", "kmeans"}, default="gmm"
        ``--model``.
    n_components, covariance_type, max_iter, num_states, init : optional
        ``--num-gauss``, ``--cov``, ``--num-iters``, ``--num-states``, ``--init``; None is
        the model kind's default, as for the CLI.
    random_state : int, default=0
        ``--seed`` (None or a RandomState draws one).
    client : distributed.Client, optional
        Train and recognise on this Dask cluster (the same bits as in process); the feature
        files must be readable by its workers at the same paths.
    nj : int, default=8
        ``--nj``.
    tol : float, default=0.0
    precision : {"float32", "float64"}, default="float32"
    mstep_style : {"kaldi", "sklearn"}, default="kaldi"
    reg_covar : float, default=1e-6

    Attributes
    ----------
    models_ : dict of str to model
        ``{label: GMM, HMM or Codebook}``.
    classes_ : ndarray of str
        The labels, sorted.
    n_features_in_ : int
    """

    def __init__(self, model="gmm", n_components=None, covariance_type=None, max_iter=None,
                 num_states=None, init=None, random_state=0, client=None, nj=8, *, tol=0.0,
                 precision="float32", mstep_style="kaldi", reg_covar=1e-6):
        self.model = model
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.num_states = num_states
        self.init = init
        self.random_state = random_state
        self.client = client
        self.nj = nj
        self.tol = tol
        self.precision = precision
        self.mstep_style = mstep_style
        self.reg_covar = reg_covar

    def _config(self) -> TrainConfig:
        given = {"num_gauss": self.n_components, "covariance_type": self.covariance_type,
                 "num_iters": self.max_iter, "num_states": self.num_states, "init": self.init}
        options = {k: v for k, v in given.items() if v is not None}
        try:
            return TrainConfig.for_model(
                self.model, **options, nj=self.nj, seed=_seeds(self.random_state, 1)[0],
                tol=self.tol, estep=EStepOptions(dtype=self.precision),
                mstep=MStepOptions(style=self.mstep_style, reg_covar=self.reg_covar))
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @staticmethod
    def _data_dir(X, require_labels: bool) -> DataDir:
        if not _is_path(X):
            raise TypeError(f"WordRecognizer takes the path of a Kaldi data dir, not "
                            f"{type(X).__name__}")
        return load_data_dir(X, require_labels=require_labels)

    def fit(self, X, y=None):
        """Train one model per word of the data dir ``X`` (``emdist train X``)."""
        config = self._config()
        data = self._data_dir(X, require_labels=True)
        self.models_ = dict(train(data, config, self._backend()))
        self.classes_ = np.array(sorted(self.models_))
        self.n_features_in_ = data.dim
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "models_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise _not_fitted(self)

    def predict(self, X) -> list[str | None]:
        """The best word of each utterance of the data dir ``X``, in ``feats.scp`` order
        (None for an utterance that no model can score: shorter than every HMM word model's
        number of states)."""
        self._check_fitted()
        data = self._data_dir(X, require_labels=False)
        scores = score(self.models_, data, self._backend(), self.nj)
        return [decide(scores[u.utt_id])[0] for u in data.utts]

    def score(self, X, y=None) -> float:
        """Accuracy on the data dir ``X`` against its ``text`` (1 - ``emdist test``'s
        error rate)."""
        self._check_fitted()
        data = self._data_dir(X, require_labels=True)
        return 1.0 - evaluate(self.models_, data, self._backend(), self.nj).error_rate

    def save(self, path) -> None:
        """Write the models as an emdist model file (what ``emdist train`` writes as
        ``final.mdl``; ``emdist test`` reads it)."""
        self._check_fitted()
        save_models(path, self.models_)
