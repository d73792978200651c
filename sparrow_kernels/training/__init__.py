"""Training entry points (`sparrow train-target`, `sparrow train-draft`). Import the
submodules explicitly; this package must stay import-light."""
