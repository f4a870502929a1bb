"""Training: the fold runner (`mmfold train`), the torch loop and its checkpoints, losses, input caches, collect."""
