"""Participant-level prediction with a trained model (``participant --model DIR``).

- :mod:`.models`: load a pretrained or fine-tuned model directory (:func:`load_prediction_model`).
- :mod:`.atlas`: the AAL3 atlas on the model grid, read back from ``output_dir``.
- :mod:`.run`: per run and participant: embeddings, outputs, region error,
  attribution and maps (:func:`predict_participant`, :func:`predict_many`).
- :mod:`.regionerror`: per-region reconstruction error of the masked autoencoder.
- :mod:`.attribution`: occlusion and integrated gradients projected onto AAL3 regions.
- :mod:`.group`: the group summary and report of a model.
- :mod:`.naming`, :mod:`.tables`, :mod:`.maps`, :mod:`.inference`: names, TSVs, NIfTI maps, batching.

Submodules are imported on use, so importing this package loads no torch.
"""
