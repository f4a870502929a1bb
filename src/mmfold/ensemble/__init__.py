"""Blending: blenders, thresholds, honest scoring, the submission file and log (`mmfold blend`, `mmfold submit`)."""
