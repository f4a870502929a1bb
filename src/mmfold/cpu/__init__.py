"""CPU members: TF-IDF / frozen-encoder features with sklearn-style heads, and the frozen encoders."""
