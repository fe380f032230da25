"""Files: model and statistics archives (``modelio``, atomic writes, never pickles) and the
Kaldi-style experiment dir (``expdir``: numbered models, per-job logs, metrics, resume)."""
