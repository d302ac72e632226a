"""Test fixtures shipped with the package, in one place (nothing here runs in a stage).

- :mod:`.fmriprep`: tiny fMRIPrep derivative trees (real NIfTI headers, unequal
  axes, realistic clutter) and raw BIDS datasets for discovery tests;
- :mod:`.store`: synthetic model-ready stores written through the store's own
  code, and AAL3-like label maps on the model grid;
- :mod:`.cohort`: a labelled cohort (store + participants table + atlas) with a
  planted signal, for fine-tuning and comparison tests.

The fMRIPrep *datasets* with a realistic signal (demo, end-to-end tests,
science check) come from the one dataset generator, :mod:`bids_regionmae.synthetic`.
"""
