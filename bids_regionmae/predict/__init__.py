"""Participant-level prediction with a trained model (``participant --model DIR``).

- :mod:`.models`: the prediction view of an opened model directory (:func:`load_prediction_model`).
- :mod:`.context`: settings and the *load* step of one run (:class:`PredictSettings`, :func:`load_run`).
- :mod:`.run`: per run (load -> infer -> attribute -> write) and per participant
  (:func:`predict_run`, :func:`predict_participant`, :func:`predict_many`).
- :mod:`.regionerror`: per-region reconstruction error of the masked autoencoder.
- :mod:`.attribution`: occlusion and integrated gradients (pure torch);
  :mod:`.explain`: the *attribute* step of a run, projected onto AAL3 regions.
- :mod:`.writers`: the *write* step: tables, maps and figures of a run and a participant.
- :mod:`.group`: the group summary tables and figures of a model.
- :mod:`.maps`, :mod:`.inference`: NIfTI maps, batching and precision.

Submodules are imported on use, so importing this package loads no torch.
"""
