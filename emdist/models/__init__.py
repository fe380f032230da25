"""The numerics: models, their statistics and their updates (numpy only, no Dask, no files).

``kind`` (the model-kind protocol the engine talks to) and the three kinds: ``gmm_kind``,
``hmm_kind`` (with ``hmm``: left-to-right GMM-HMMs, forward-backward, Baum-Welch) and ``vq``
(k-means codebooks); ``defaults`` (each kind's default options). Under them: ``gmm`` (the
model and its log-likelihoods), ``kernel`` (per-model constants and the posterior pipeline of
a chunk of frames), ``estep`` (statistics of frames, chunk by chunk), ``gselect`` (the E-step
over each frame's selected Gaussians), ``stats`` (additive statistics), ``mstep`` (updates
with Kaldi's floors) and ``initialize`` (k-means++, mix-up).
"""
