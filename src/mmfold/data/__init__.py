"""The data layer: reading and validating a competition, folds, the demo competition."""
