"""bids_regionmae: region-aware masked pretraining of 4D fMRI foundation models as a BIDS-App."""

__version__ = "0.1.0"

__all__ = ["__version__"]
