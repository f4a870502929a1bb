"""The report (`mmfold report`) and its plots."""
