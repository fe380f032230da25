"""What decides a trained model (:class:`TrainConfig`) and what each iteration records
(:class:`IterationRecord`): plain values that the engine, the trainer and the
initialisation passes share, below all of them (no import circle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from emdist.errors import UserError
from emdist.models.defaults import KIND_DEFAULTS
from emdist.models.estep import EStepOptions
from emdist.models.gmm import COVARIANCE_TYPES
from emdist.models.kind import MODEL_KINDS
from emdist.models.mstep import MStepOptions

__all__ = ["IterationRecord", "KIND_DEFAULTS", "TrainConfig", "kind_defaults"]

def kind_defaults(model: str) -> dict:
    """The default options of a model kind (see :data:`emdist.models.defaults.KIND_DEFAULTS`)."""
    if model not in KIND_DEFAULTS:
        raise UserError(f"--model must be one of {', '.join(KIND_DEFAULTS)}")
    return dict(KIND_DEFAULTS[model])


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model (and nothing that does not).

    The number of workers and the backend are not here: they never change the result.
    """

    model: str = "gmm"
    num_gauss: int = KIND_DEFAULTS["gmm"]["num_gauss"]
    covariance_type: str = KIND_DEFAULTS["gmm"]["covariance_type"]
    num_iters: int = KIND_DEFAULTS["gmm"]["num_iters"]
    init: str = KIND_DEFAULTS["gmm"]["init"]
    nj: int = 8
    global_mode: bool = False
    seed: int = 0
    tol: float = 0.0
    kmeans_iters: int = 10
    mixup_iters: int = 2
    perturb_factor: float = 0.1
    max_sample_frames: int = 200_000
    gselect: int = 0
    subsample: int = 1
    num_states: int = 5
    skip: bool = False
    viterbi: bool = False
    skip_bad_utts: bool = False
    max_skip_fraction: float = 0.1
    estep: EStepOptions = field(default_factory=lambda: EStepOptions(dtype="float32"))
    mstep: MStepOptions = field(default_factory=MStepOptions)

    def __post_init__(self) -> None:
        checks = [
            (self.model in MODEL_KINDS, f"--model must be one of {', '.join(MODEL_KINDS)}"),
            (self.model != "hmm" or not self.global_mode,
             "--model hmm trains word models; --global needs --model gmm or kmeans"),
            (self.model == "gmm" or self.gselect == 0, "--gselect needs --model gmm"),
            (self.model != "hmm" or self.init == "mixup",
             "--model hmm starts flat (uniform segmentation) and mixes up: --init mixup"),
            (self.num_states >= 1, "--num-states must be at least 1"),
            (self.model == "hmm" or not self.viterbi, "--viterbi trains --model hmm"),
            (self.num_gauss >= 1, "--num-gauss must be at least 1"),
            (self.covariance_type in COVARIANCE_TYPES, "--cov must be 'diag' or 'full'"),
            (self.num_iters >= 0, "--num-iters must be at least 0"),
            (self.init in ("kmeans", "mixup"), "--init must be 'kmeans' or 'mixup'"),
            (self.nj >= 1, "--nj must be at least 1"),
            (self.tol >= 0, "--tol must not be negative"),
            (self.kmeans_iters >= 0, "--kmeans-iters must not be negative"),
            (self.mixup_iters >= 1, "--mixup-iters must be at least 1"),
            (self.estep.dtype in ("float32", "float64"), "--precision: float32 or float64"),
            (self.estep.chunk_size >= 1, "--chunk-size must be at least 1"),
            (self.gselect >= 0, "--gselect must be 0 (off) or a number of Gaussians"),
            (self.gselect == 0 or self.global_mode,
             "--gselect selects Gaussians of one --global model (a UBM); add --global"),
            (self.subsample >= 1, "--subsample must be at least 1"),
            (0 <= self.max_skip_fraction <= 1, "--max-skip-fraction must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @classmethod
    def for_model(cls, model: str, **options) -> TrainConfig:
        """The configuration ``emdist train --model MODEL`` uses: that kind's defaults
        (:func:`kind_defaults`; the dataclass defaults are the GMM's), then ``options``."""
        return cls(model=model, **{**kind_defaults(model), **options})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def selects(self) -> bool:
        """Gaussian selection is on and leaves some Gaussians out (else exact EM)."""
        return 0 < self.gselect < self.num_gauss


@dataclass(frozen=True)
class IterationRecord:
    """One line of ``metrics.jsonl``: the pass that turned ``iter-1``.mdl into ``iter``.mdl."""

    iter: int
    loglike_per_frame: float
    frames: int
    floored: int
    removed: int
    n_components: dict
    seconds: float
    loglike_by_label: dict = field(default_factory=dict)
    """Per model: the log-likelihood per frame of its own frames under ``iter-1``.mdl."""
    occupancy: dict = field(default_factory=dict)
    """Per model: each Gaussian's occupancy (zeroth-order statistic) under ``iter-1``.mdl,
    to 6 significant digits (an HMM's Gaussians state after state; a codebook's counts)."""

    def to_dict(self) -> dict:
        return asdict(self)
