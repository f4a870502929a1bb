"""mmfold: K-fold multi-label classification of images with captions."""

__version__ = "0.1.0"
