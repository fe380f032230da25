"""Kaldi data dirs: ``feats.scp``, ``text``, ``utt2spk``, ``utt2num_frames``; validation with
one-line errors, feature reading, and sharding by frames (``datadir``)."""
