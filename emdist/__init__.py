"""emdist: EM training of Gaussian mixture models on Kaldi features, from a laptop to a
Dask cluster.

The Python API mirrors the CLI:

>>> import emdist
>>> data = emdist.load_data_dir(emdist.digits_dir("train"))            # doctest: +SKIP
>>> models = emdist.train(data, emdist.TrainConfig(), emdist.SerialBackend())  # doctest: +SKIP
>>> emdist.load_models("exp/digits/final.mdl")["Z"].means.shape       # doctest: +SKIP
(32, 39)

Heavy modules load on first use, so ``import emdist`` stays cheap and never imports
``distributed``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GMM": "emdist.models.gmm",
    "HMM": "emdist.models.hmm",
    "HmmStats": "emdist.models.hmm",
    "Codebook": "emdist.models.vq",
    "GmmStats": "emdist.models.stats",
    "EStepOptions": "emdist.models.estep",
    "accumulate": "emdist.models.estep",
    "MStepOptions": "emdist.models.mstep",
    "UpdateReport": "emdist.models.mstep",
    "m_step": "emdist.models.mstep",
    "load_models": "emdist.io.modelio",
    "save_models": "emdist.io.modelio",
    "load_stats": "emdist.io.modelio",
    "save_stats": "emdist.io.modelio",
    "DataDir": "emdist.data.datadir",
    "load_data_dir": "emdist.data.datadir",
    "TrainConfig": "emdist.engine",
    "train": "emdist.engine",
    "ExpDir": "emdist.io.expdir",
    "SerialBackend": "emdist.backends.serial",
    "score": "emdist.recognizer",
    "evaluate": "emdist.recognizer",
    "Results": "emdist.recognizer",
    "digits_dir": "emdist.corpora",
    "EmdistError": "emdist.errors",
    "UserError": "emdist.errors",
    "RuntimeFailure": "emdist.errors",
    "GaussianMixture": "emdist.api",
    "WordRecognizer": "emdist.api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'emdist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
