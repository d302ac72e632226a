"""Training: a reusable distributed engine, clip datasets and masked-reconstruction pretraining.

- :mod:`.engine`: :class:`~.engine.Trainer` (AdamW + warm-up/cosine, bf16 autocast on
  CUDA, gradient accumulation, DDP via ``torchrun``, atomic checkpoints with exact
  resume, CSV/TensorBoard/tqdm logging), driven by a caller's step function.
- :mod:`.data`: :class:`~.data.ClipDataset` over the model-ready store (memory maps,
  integer downsampling to the model grid) and :func:`~.data.split_participants`.
- :mod:`.pretrain`: the pretraining step/evaluation functions and :func:`~.pretrain.pretrain`.

Nothing is imported here, so ``import bids_regionmae.train`` stays cheap.
"""
