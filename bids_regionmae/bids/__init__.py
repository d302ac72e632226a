"""Discovery of fMRIPrep derivatives and phenotype labels."""
