"""Every benchmark: synthetic speed/quality (`mmfold bench`), real data (`mmfold bench-real`), scale."""
