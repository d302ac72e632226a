"""Fine-tuning on phenotypes: tasks and losses, labelled clips, the engine step, cross-validation.

- :mod:`.task` -- :class:`~.task.Task` (binary / multiclass / regression),
  class weights from the training participants, clip and subject losses;
- :mod:`.data` -- :class:`~.data.LabelledClips` (clips + targets, cached in
  memory when small), :class:`~.data.EmbeddingSet` (linear-probe cache),
  :func:`~.data.subset` by participant, sharded :func:`~.data.infer`;
- :mod:`.train` -- step and subject-level evaluation functions for
  :class:`bids_regionmae.train.engine.Trainer`, :class:`~.train.EarlyStopping`,
  :func:`~.train.fit`;
- :mod:`.model` -- starting encoders (pretrained directory or random) and
  :class:`~bids_regionmae.models.heads.FinetuneModel` construction;
- :mod:`.cv` -- :class:`~.cv.Finetuner`: one model per participant split,
  scored on that split's test participants only, and the final refit;
- :mod:`.cohort` -- the labelled cohort, its leak-free splits and the
  connectivity baseline on them.

The stage workflows (:mod:`bids_regionmae.workflows.finetune`,
:mod:`bids_regionmae.workflows.compare`) read labels and data and call these
pieces; :mod:`bids_regionmae.reports.finetune` writes the tables and pages.
"""

from __future__ import annotations

__all__ = ["cohort", "cv", "data", "model", "task", "train"]
