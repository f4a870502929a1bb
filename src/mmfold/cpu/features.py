"""Member features: what a CPU member reads about a row, and the blocks that turn it into a matrix.

A member's input for a set of rows is a :class:`MemberInput` (ids, captions, and the cached
frozen-encoder embeddings it asked for). Feature *blocks* are scikit-learn-style transformers
over that input, ``fit(inp)`` on the training fold's rows only and ``transform(inp)`` on any
rows: TF-IDF (vocabulary and idf), TF-IDF -> SVD, and embeddings -> scaler -> PCA -> scale.
What they learn lives in attributes ending in ``_`` that skops can store, so a fold's fitted
member transforms a new test set exactly as it transformed the rows it scored.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion
from sklearn.preprocessing import StandardScaler

from mmfold.data.competition import Competition
from mmfold.errors import UserError

log = logging.getLogger(__name__)

EncoderSpec = tuple[str, dict[str, Any]]  # (encoder name, its settings)


@dataclass
class MemberInput:
    """The rows a member sees: ids, captions (None without a caption column) and embeddings
    by encoder name, all in the same row order."""

    ids: np.ndarray
    captions: list[str] | None
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, idx: np.ndarray) -> MemberInput:
        """The input of rows ``idx`` (a fold's train or scored rows)."""
        caps = None if self.captions is None else [self.captions[i] for i in idx]
        return MemberInput(self.ids[idx], caps, {k: v[idx] for k, v in self.embeddings.items()})

    def concat(self, other: MemberInput) -> MemberInput:
        """These rows, then ``other``'s (a student's train rows, then its pseudo-labelled test rows)."""
        caps = None if self.captions is None else [*self.captions, *(other.captions or [])]
        emb = {k: np.concatenate([v, other.embeddings[k]]) for k, v in self.embeddings.items()}
        return MemberInput(np.concatenate([self.ids, other.ids]), caps, emb)


def require(comp: Competition, modality: str, who: str) -> None:
    """Fail clearly when a member needs captions or images the data config does not have."""
    have = {"text": comp.has_captions, "image": comp.has_images}[modality]
    if not have:
        what = "caption column (data.caption_col)" if modality == "text" else "image folder (data.image_dir)"
        raise UserError(f"{who} needs a {what}, but data '{comp.cfg.name}' has none")


def member_input(comp: Competition, split: str, encoders: list[EncoderSpec]) -> MemberInput:
    """Every row of ``split`` (``train``/``test``) with the embeddings of ``encoders``
    (cached per split and input, so a second fold or a re-predict costs an ``np.load``)."""
    from mmfold.cpu.encoders import build_encoder, embed

    df = comp.train if split == "train" else comp.test
    emb = {}
    for name, settings in encoders:
        require(comp, build_encoder(name, **settings).modality, f"encoder {name}")
        emb[name] = embed(comp, split, name, **settings)
    caps = df["caption"].tolist() if comp.has_captions else None
    return MemberInput(np.asarray(comp.ids(split)), caps, emb)


def tfidf_vectorizer(word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] | None = (2, 5),
                     min_df: int = 2, max_features: int | None = None) -> FeatureUnion:
    """Word and char-n-gram TF-IDF side by side (char n-grams catch typos and word pieces)."""
    parts = [("word", TfidfVectorizer(ngram_range=tuple(word_ngrams), min_df=min_df, sublinear_tf=True,
                                      max_features=max_features, token_pattern=r"(?u)\b\w+\b"))]
    if char_ngrams:
        parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams), min_df=min_df,
                                              sublinear_tf=True, max_features=max_features)))
    return FeatureUnion(parts)


class TfidfBlock(BaseEstimator, TransformerMixin):
    """Caption TF-IDF (sparse); vocabulary and idf from the fitted rows only."""

    def __init__(self, opts: dict[str, Any] | None = None) -> None:
        self.opts = opts

    def needed_encoders(self) -> list[EncoderSpec]:
        """Embeddings this block reads: none."""
        return []

    def fit(self, inp: MemberInput, y: Any = None) -> TfidfBlock:
        """Learn the vocabulary and idf of the rows' captions."""
        if inp.captions is None:
            raise UserError("tfidf features need a caption column (data.caption_col)")
        self.vectorizer_ = tfidf_vectorizer(**(self.opts or {})).fit(inp.captions)
        self.info_ = {"tfidf_features": sum(len(v.vocabulary_) for _, v in self.vectorizer_.transformer_list)}
        return self

    def transform(self, inp: MemberInput) -> Any:
        """CSR TF-IDF rows."""
        return self.vectorizer_.transform(inp.captions)

    def __getstate__(self) -> dict[str, Any]:
        """The fitted vectorisers as arrays: each part's terms in column order and its idf.

        skops would store a vocabulary dict node by node (about 1 kB a term: 30 MB of JSON and
        seconds to load for 40k terms); as a string array it is a few hundred kB of ``.npy``."""
        state = dict(super().__getstate__())
        vec = state.pop("vectorizer_", None)
        if vec is not None:
            state["terms_"] = {n: np.array(sorted(v.vocabulary_, key=v.vocabulary_.get)) for n, v in vec.transformer_list}
            state["idf_"] = {n: v.idf_ for n, v in vec.transformer_list}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the vectorisers from the stored terms and idf (same columns, same values)."""
        state = dict(state)
        terms, idf = state.pop("terms_", None), state.pop("idf_", None)
        super().__setstate__(state)
        if terms is not None:
            vec = tfidf_vectorizer(**(self.opts or {}))
            for name, v in vec.transformer_list:
                v.vocabulary_ = {t: i for i, t in enumerate(terms[name].tolist())}
                v.idf_ = idf[name]
            self.vectorizer_ = vec


class SvdBlock(BaseEstimator, TransformerMixin):
    """TF-IDF -> truncated SVD (dense, tree-friendly), both fitted on the fitted rows only."""

    def __init__(self, opts: dict[str, Any] | None = None, dim: int = 64) -> None:
        self.opts = opts
        self.dim = dim

    def needed_encoders(self) -> list[EncoderSpec]:
        """Embeddings this block reads: none."""
        return []

    def fit(self, inp: MemberInput, y: Any = None) -> SvdBlock:
        """Fit the TF-IDF, then the SVD on its training rows."""
        self._fit(inp)
        return self

    def fit_transform(self, inp: MemberInput, y: Any = None) -> np.ndarray:
        """Fit, and the fitted rows' components from the TF-IDF matrix the SVD was fitted on
        (the costly char n-gram pass runs once, not twice)."""
        X = self._fit(inp)
        return self.svd_.transform(X)

    def _fit(self, inp: MemberInput) -> Any:
        """Fit both steps; return the fitted rows' TF-IDF matrix."""
        self.tfidf_ = TfidfBlock(self.opts).fit(inp)
        X = self.tfidf_.transform(inp)
        self.svd_ = TruncatedSVD(n_components=min(int(self.dim), X.shape[1] - 1), random_state=42).fit(X)
        self.info_ = {**self.tfidf_.info_, "svd_dim": int(self.svd_.n_components)}
        return X

    def transform(self, inp: MemberInput) -> np.ndarray:
        """Dense SVD components."""
        return self.svd_.transform(self.tfidf_.transform(inp))


class DenseReducer(BaseEstimator, TransformerMixin):
    """PCA to ``pca_dim`` components, then a scale making the mean training row norm ``weight``.

    Both fitted on the training fold only. Next to unit-norm TF-IDF rows, 1,664 standardized
    embedding dims (row norm ~40) swamp the words under one C; scaled to norm ~1 the two views
    share the regularisation. PCA also keeps a sparse-solver fit at seconds, not minutes:
    liblinear's cost grows with the non-zeros, and a dense block makes every entry one.
    """

    def __init__(self, pca_dim: int | None = None, weight: float | None = None) -> None:
        self.pca_dim = pca_dim
        self.weight = weight

    def fit(self, X: np.ndarray, y: Any = None) -> DenseReducer:
        """Fit the PCA (no more components than training rows) and the scale."""
        k = min(int(self.pca_dim or X.shape[1]), X.shape[0])
        self.pca_ = PCA(k, random_state=0).fit(X) if k < X.shape[1] else None
        Z = self._project(X)
        norm = max(float(np.sqrt((Z ** 2).sum(1).mean())), 1e-12)
        self.scale_ = float(self.weight) / norm if self.weight else 1.0
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project and scale."""
        Z = self._project(X)
        return Z * self.scale_ if self.weight else Z

    def _project(self, X: np.ndarray) -> np.ndarray:
        """The PCA projection, summed in float64 and rounded to ``X``'s dtype: a float32 BLAS
        product sums a row in an order that depends on its place in the block, so the same
        row in another test set would move by an ulp (see ``KNNHead._similarity``)."""
        if self.pca_ is None:
            return X
        return self.pca_.transform(np.asarray(X, dtype=np.float64)).astype(np.asarray(X).dtype, copy=False)


class EmbedBlock(BaseEstimator, TransformerMixin):
    """Frozen-encoder embeddings side by side, optionally standardized and reduced.

    Standardizing matters because concatenated encoders live on different scales (unit-norm
    MiniLM vs non-negative EfficientNet activations); one C then fits both.

    Args:
        encoders: Encoder names, in column order.
        settings: Per-encoder options (part of each embedding's cache key).
        standardize: Zero-mean unit-variance per feature, fitted rows' statistics.
        pca_dim: See :class:`DenseReducer`.
        dense_weight: See :class:`DenseReducer`.
        block_norm: After standardizing, scale each encoder's columns to unit norm per row
            (divided by sqrt(#encoders)), so every encoder weighs the same in a cosine
            neighbour search over the concatenation (a 1,280-d image embedding would otherwise
            drown a 384-d caption one).
    """

    def __init__(self, encoders: list[str] | None = None, settings: dict[str, dict] | None = None,
                 standardize: bool = False, pca_dim: int | None = None, dense_weight: float | None = None,
                 block_norm: bool = False) -> None:
        self.encoders = encoders
        self.settings = settings
        self.standardize = standardize
        self.pca_dim = pca_dim
        self.dense_weight = dense_weight
        self.block_norm = block_norm

    def needed_encoders(self) -> list[EncoderSpec]:
        """The (name, settings) of every embedding this block reads."""
        return [(n, dict((self.settings or {}).get(n, {}))) for n in self.encoders or []]

    def _stack(self, inp: MemberInput) -> np.ndarray:
        """The encoders' embeddings as one matrix."""
        return np.hstack([inp.embeddings[n] for n, _ in self.needed_encoders()])

    def fit(self, inp: MemberInput, y: Any = None) -> EmbedBlock:
        """Fit the scaler and the reducer on the rows' embeddings."""
        if not self.encoders:
            raise UserError("embedding features need at least one encoder in model.params.encoders")
        X = self._stack(inp)
        self.spans_ = np.cumsum([0] + [inp.embeddings[n].shape[1] for n, _ in self.needed_encoders()])
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        X = self._normed(X if self.scaler_ is None else self.scaler_.transform(X))
        reduce = bool(self.pca_dim or self.dense_weight)
        self.reducer_ = DenseReducer(self.pca_dim, self.dense_weight).fit(X) if reduce else None
        dim = X.shape[1] if self.reducer_ is None else self.reducer_.transform(X[:1]).shape[1]
        self.info_ = {"embedding_dim": int(dim)}
        return self

    def transform(self, inp: MemberInput) -> np.ndarray:
        """Dense features of the rows."""
        X = self._stack(inp)
        X = self._normed(X if self.scaler_ is None else self.scaler_.transform(X))
        return X if self.reducer_ is None else self.reducer_.transform(X)

    def _normed(self, X: np.ndarray) -> np.ndarray:
        """Each encoder's block at norm 1/sqrt(#encoders) per row, with ``block_norm``.

        ``getattr``: member files saved before this option existed have no such attribute."""
        if not getattr(self, "block_norm", False):
            return X
        X = np.array(X, dtype=np.float64)
        spans = self.spans_
        for lo, hi in zip(spans[:-1], spans[1:]):
            norm = np.linalg.norm(X[:, lo:hi], axis=1, keepdims=True)
            X[:, lo:hi] /= np.maximum(norm, 1e-12) * np.sqrt(len(spans) - 1)
        return X


class IdBlock(BaseEstimator, TransformerMixin):
    """The number inside each row id, centred and in units of the typical gap between training ids.

    Where ids were issued over time (product catalogues, scraped posts), rows with nearby ids
    share what changed with time (season, collection, photographer), a signal no caption or
    pixel carries. As one feature for a euclidean neighbour vote it costs nothing to try, and
    ``mmfold levers`` says honestly whether it pays (see the ``id_knn`` member). Centring on
    the training median keeps large ids (timestamps) exact in float64 distances.

    Args:
        pattern: Regular expression; its first match in an id (group 1 if it has a group) is
            the number. The default takes the first run of digits ("17903.jpg" -> 17903).
    """

    def __init__(self, pattern: str = r"\d+") -> None:
        self.pattern = pattern

    def needed_encoders(self) -> list[EncoderSpec]:
        """Embeddings this block reads: none (only the ids)."""
        return []

    def numbers(self, ids: np.ndarray) -> np.ndarray:
        """Each id's number as float64; an id without one is an error naming it."""
        rx = re.compile(self.pattern)
        out = np.empty(len(ids), dtype=np.float64)
        for i, raw in enumerate(ids):
            m = rx.search(str(raw))
            try:
                out[i] = float(m.group(1) if rx.groups else m.group(0))  # type: ignore[union-attr]
            except (AttributeError, TypeError, ValueError):  # no match, an empty group, not a number
                raise UserError(f"id '{raw}' has no number matching model.params.pattern "
                                f"{self.pattern!r}") from None
        return out

    def fit(self, inp: MemberInput, y: Any = None) -> IdBlock:
        """Learn the centre, the unit (median gap between neighbouring distinct ids) and the range.

        Raises:
            UserError: fewer distinct numbers than half the rows: the pattern does not number
                the rows (e.g. every id starts with the same year), so every distance would tie.
        """
        x = self.numbers(inp.ids)
        distinct = np.unique(x)
        if len(distinct) < max(2, len(x) // 2):
            raise UserError(f"only {len(distinct)} distinct numbers in {len(x)} ids with model.params.pattern "
                            f"{self.pattern!r} (e.g. '{inp.ids[0]}'): it does not number the rows; "
                            "give a pattern whose group is each row's own number")
        self.gap_ = float(np.median(np.diff(distinct)))
        self.center_ = float(np.median(x))
        self.range_ = (float(distinct[0]), float(distinct[-1]))
        self.info_ = {"id_gap": self.gap_, "id_range": list(self.range_)}
        return self

    def transform(self, inp: MemberInput) -> np.ndarray:
        """``(n, 1)`` float64: (id number - centre) / gap; warns when most rows lie outside
        the training range, where the vote is only the labels of the range's edge."""
        x = self.numbers(inp.ids)
        lo, hi = self.range_
        if len(x) and np.mean((x < lo) | (x > hi)) > 0.5:
            _warn_outside(self.pattern, lo, hi)
        return ((x - self.center_) / self.gap_)[:, None]


@functools.lru_cache(maxsize=None)
def _warn_outside(pattern: str, lo: float, hi: float) -> None:
    """Say once per training range that the scored ids lie outside it."""
    log.warning("id_knn: most scored ids lie outside the training ids' range [%g, %g] (pattern %r): their "
                "neighbours are the rows at the range's edge, so the vote carries nothing; id neighbours "
                "only help where test ids interleave with training ids", lo, hi, pattern)


# Every type a fitted block may hold beyond skops' defaults: what member files are loaded with.
TRUSTED_TYPES = (
    "mmfold.cpu.features.TfidfBlock", "mmfold.cpu.features.SvdBlock", "mmfold.cpu.features.DenseReducer",
    "mmfold.cpu.features.EmbedBlock", "mmfold.cpu.features.IdBlock",
)
