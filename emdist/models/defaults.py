"""Default options of each model kind, where ``emdist train`` is not given them (a plain
table: the CLI reads it for ``--help`` without importing numpy).

Chosen by cross-validation by speaker on the training set, never on a test set:
``scripts/cv_defaults.py``, table in the README.
"""

KIND_DEFAULTS = {
    "gmm": {"num_gauss": 32, "covariance_type": "diag", "num_iters": 20, "init": "mixup"},
    "hmm": {"num_gauss": 4, "covariance_type": "diag", "num_iters": 10, "num_states": 6,
            "init": "mixup"},
    "kmeans": {"num_gauss": 256, "covariance_type": "diag", "num_iters": 10, "init": "kmeans"},
}
"""What ``emdist train --model M`` uses where an option is not given, per model kind
(chosen by cross-validation on the training set: ``scripts/cv_defaults.py``)."""
