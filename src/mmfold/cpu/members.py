"""CPU-fast members: TF-IDF + linear, frozen-encoder embeddings + head, LightGBM.

Each member kind is ``fn(cfg, comp, train_idx, valid_idx) -> (valid_probs, test_probs, info)``
and registered in :data:`MEMBERS`, so ``mmfold train`` runs it per fold and writes the same
OOF/test files as the torch engine; the blender cannot tell them apart.

A member is *features* + a *head*. Features that learn anything from data (TF-IDF vocabulary
and idf, SVD, scaler) are fitted on ``train_idx`` only, never on the fold being scored; frozen
encoder embeddings learn nothing from the labels, so they are computed once and cached
(:mod:`mmfold.cpu.encoders`). Heads live in :data:`HEADS` and are multi-label estimators with
``fit(X, Y)`` / ``predict_proba(X) -> (n, L)``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion
from sklearn.preprocessing import StandardScaler

from mmfold.config import Config
from mmfold.cpu.threads import available_cores, torch_threads
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.registry import Registry

log = logging.getLogger(__name__)

MEMBERS = Registry("CPU member kind")
HEADS = Registry("member head")

MemberOutput = tuple[np.ndarray, np.ndarray | None, dict[str, Any]]


# ------------------------------------------------------------------------------ params


def resolve_params(cfg: Config, defaults: dict[str, Any]) -> dict[str, Any]:
    """The member's defaults updated by ``model.params``; unknown keys are errors (typos)."""
    given = dict(cfg.model.params)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"model '{cfg.model.name}' ({cfg.model.kind}): unknown params {unknown}; "
                        f"valid: {sorted(defaults)}")
    return {**defaults, **given}


def _sub(params: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested options dict (``head_params``...), copied so callers can't mutate the config."""
    return dict(params.get(key) or {})


# ------------------------------------------------------------------------------- heads


class PerLabel(BaseEstimator, ClassifierMixin):
    """One binary estimator per label; labels a training fold cannot learn get their prior.

    ``OneVsRestClassifier`` fits nothing sensible for a label with no (or too few) positives in
    a training fold (rare labels on 5 folds, or most COCO labels on 106 rows): here such a
    label predicts its training rate instead (0 when absent), and the fold still runs.

    Args:
        estimator: A binary classifier with ``predict_proba``; cloned per label.
        min_positives: Fewer positives (or negatives) than this -> prior.
        n_jobs: Labels fitted in parallel (threads: the solvers release the GIL); None: one
            per core available to the process.
    """

    def __init__(self, estimator: Any, min_positives: int = 1, n_jobs: int | None = None) -> None:
        self.estimator = estimator
        self.min_positives = min_positives
        self.n_jobs = n_jobs

    def fit(self, X: Any, Y: np.ndarray) -> PerLabel:
        """Fit one clone per learnable label; set ``prior_`` and ``estimators_``."""
        from joblib import Parallel, delayed

        Y = np.asarray(Y)
        self.prior_ = Y.mean(0).astype(np.float32)
        pos = Y.sum(0)
        cols = [j for j in range(Y.shape[1]) if min(pos[j], len(Y) - pos[j]) >= self.min_positives]
        fitted = Parallel(n_jobs=self.n_jobs or available_cores(), prefer="threads")(
            delayed(_fit_binary)(clone(self.estimator), X, Y[:, j]) for j in cols)
        self.estimators_ = dict(zip(cols, fitted))
        self.constant_labels_ = [j for j in range(Y.shape[1]) if j not in self.estimators_]
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """``(n, L)`` positive-class probabilities (prior for unlearnable labels)."""
        out = np.tile(self.prior_, (X.shape[0], 1))
        for j, est in self.estimators_.items():
            out[:, j] = est.predict_proba(X)[:, 1]
        return out


def _fit_binary(est: Any, X: Any, y: np.ndarray) -> Any:
    """Fit one label's estimator (module level so joblib can dispatch it)."""
    return est.fit(X, y)


class TorchMLP(BaseEstimator, ClassifierMixin):
    """A one-hidden-layer MLP with sigmoid outputs, trained with BCE on all labels at once.

    Sharing the hidden layer across labels lets rare labels borrow features from frequent
    ones, which per-label logistic regression cannot. A fixed epoch budget (no early stopping
    on the scored fold) keeps it honest; one-cycle decay makes the last epoch a good one.
    Sparse input (TF-IDF) goes through an ``EmbeddingBag`` first layer, so a batch costs its
    non-zeros, not ``batch x vocabulary``: a fastText-style model on word and char n-grams.
    Torch runs on the cores available to the process while it fits, and on what it ran on
    before once it is done.
    """

    def __init__(self, hidden: int = 512, dropout: float = 0.3, epochs: int = 30, lr: float = 2e-3,
                 weight_decay: float = 1e-2, batch_size: int = 256, input_dropout: float = 0.1,
                 seed: int = 42) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.input_dropout = input_dropout
        self.seed = seed

    def fit(self, X: Any, Y: np.ndarray) -> TorchMLP:
        """Train ``net_`` on dense or sparse ``X`` and 0/1 ``Y``."""
        import torch

        with torch_threads(available_cores()):
            torch.manual_seed(self.seed)
            X = _as_input(X)
            self.net_ = _MLPNet(X.shape[1], self.hidden, Y.shape[1], sparse=sp.issparse(X), p_in=self.input_dropout,
                               p=self.dropout)
            opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            steps = self.epochs * -(-X.shape[0] // self.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.1)
            yt = torch.as_tensor(Y, dtype=torch.float32)
            for _ in range(self.epochs):
                self._epoch(X, yt, opt, sched)
        self.net_.eval()
        return self

    def _epoch(self, X: Any, yt: Any, opt: Any, sched: Any) -> None:
        """One shuffled pass of minibatch BCE."""
        import torch

        self.net_.train()
        for idx in torch.randperm(X.shape[0]).split(self.batch_size):
            logits = self.net_(_rows(X, idx.numpy()))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def predict_proba(self, X: Any) -> np.ndarray:
        """``(n, L)`` sigmoid probabilities, in batches."""
        import torch

        X = _as_input(X)
        out = []
        with torch_threads(available_cores()), torch.inference_mode():
            for start in range(0, X.shape[0], 4096):
                out.append(torch.sigmoid(self.net_(_rows(X, np.arange(start, min(start + 4096, X.shape[0]))))).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net_.out.out_features), np.float32)


def _as_input(X: Any) -> Any:
    """CSR float32 for sparse input, C-contiguous float32 for dense."""
    return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.ascontiguousarray(X, dtype=np.float32)


def _rows(X: Any, idx: np.ndarray) -> Any:
    """A batch as the network takes it: a tensor, or (indices, offsets, values) for sparse."""
    import torch

    if not sp.issparse(X):
        return torch.from_numpy(X[idx])
    sub = X[idx]
    return (torch.from_numpy(sub.indices.astype(np.int64)), torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
            torch.from_numpy(sub.data))


@functools.cache
def _mlp_net_class() -> type:
    """The network class, defined on first use so importing members does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class MLPNet(nn.Module):
        """(Dropout) -> Linear or EmbeddingBag -> GELU -> Dropout -> Linear."""

        def __init__(self, d_in: int, hidden: int, d_out: int, *, sparse: bool, p_in: float, p: float) -> None:
            super().__init__()
            self.sparse, self.p_in = sparse, p_in
            self.first = nn.EmbeddingBag(d_in, hidden, mode="sum") if sparse else nn.Linear(d_in, hidden)
            self.bias = nn.Parameter(torch.zeros(hidden)) if sparse else None
            self.drop = nn.Dropout(p)
            self.out = nn.Linear(hidden, d_out)
            if sparse:
                nn.init.normal_(self.first.weight, std=0.02)

        def forward(self, x: Any) -> Any:
            if self.sparse:
                idx, offsets, w = x
                h = self.first(idx, offsets, per_sample_weights=F.dropout(w, self.p_in, self.training)) + self.bias
            else:
                h = self.first(F.dropout(x, self.p_in, self.training))
            return self.out(self.drop(F.gelu(h)))

    return MLPNet


def _MLPNet(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - reads like the class it builds
    """An instance of the lazily built MLP module."""
    return _mlp_net_class()(*args, **kwargs)


class KNNHead(BaseEstimator, ClassifierMixin):
    """Similarity-weighted label vote of the ``k`` nearest training rows (cosine).

    A different inductive bias from the linear and MLP heads (local, no decision boundary),
    so its errors differ and the blend gains. Exact search by matrix products in chunks:
    20k x 5k rows is a few seconds.

    Args:
        k: Neighbours per row.
        temperature: Softmax temperature over the neighbours' cosine similarities.
        chunk: Query rows per matrix product (bounds memory).
    """

    def __init__(self, k: int = 30, temperature: float = 0.05, chunk: int = 2048) -> None:
        self.k = k
        self.temperature = temperature
        self.chunk = chunk

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KNNHead:
        """Store the L2-normalised training rows and their labels."""
        from sklearn.preprocessing import normalize

        self.X_ = normalize(np.asarray(X, dtype=np.float32))
        self.Y_ = np.asarray(Y, dtype=np.float32)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, L)`` weighted label frequencies among the neighbours."""
        from sklearn.preprocessing import normalize

        Xn = normalize(np.asarray(X, dtype=np.float32))
        k = min(self.k, len(self.X_))
        parts = [self._vote(Xn[i : i + self.chunk], k) for i in range(0, len(Xn), self.chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, self.Y_.shape[1]), np.float32)

    def _vote(self, q: np.ndarray, k: int) -> np.ndarray:
        """Softmax-weighted labels of each query row's top-k neighbours."""
        sim = q @ self.X_.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, top, axis=1) / self.temperature
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return np.einsum("nk,nkl->nl", w, self.Y_[top])


@HEADS.register("knn")
def knn_head(**params: Any) -> KNNHead:
    """Cosine k-nearest-neighbour label vote (:class:`KNNHead`)."""
    return KNNHead(**params)


@HEADS.register("logreg")
def logreg_head(C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000, dual: bool = False,
                class_weight: str | None = None, min_positives: int = 1) -> PerLabel:
    """Per-label L2 logistic regression: fast, calibrated enough to threshold and blend.

    For sparse TF-IDF (features > rows) use ``solver: liblinear, dual: true``: same optimum,
    about 4x less CPU than the primal solvers.
    """
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, solver=solver, max_iter=max_iter, dual=dual, class_weight=class_weight)
    return PerLabel(lr, min_positives=min_positives)


@HEADS.register("svm")
def svm_head(C: float = 0.1, cv: int = 3, min_positives: int = 3) -> PerLabel:
    """Per-label linear SVM, sigmoid-calibrated by inner CV on the training fold only.

    Inner CV needs a positive in every inner split, hence ``min_positives`` >= ``cv``.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    svm = CalibratedClassifierCV(LinearSVC(C=C), cv=cv, method="sigmoid")
    return PerLabel(svm, min_positives=max(min_positives, cv))


@HEADS.register("mlp")
def mlp_head(**params: Any) -> TorchMLP:
    """A shared-hidden-layer MLP (:class:`TorchMLP`)."""
    return TorchMLP(**params)


@HEADS.register("lgbm")
def lgbm_head(n_estimators: int = 200, learning_rate: float = 0.05, num_leaves: int = 15,
              min_child_samples: int = 10, colsample_bytree: float = 0.3, subsample: float = 0.8,
              reg_lambda: float = 1.0, max_bin: int = 63, min_positives: int = 2) -> PerLabel:
    """Per-label LightGBM, small; one thread per model, labels fitted in parallel.

    OpenMP inside LightGBM spin-waits at every split; on a busy 2-core machine that turns a
    2 s fit into minutes. Single-threaded models on parallel labels (one per available core)
    never wait on each other.
    """
    from lightgbm import LGBMClassifier

    gbm = LGBMClassifier(n_estimators=n_estimators, learning_rate=learning_rate, num_leaves=num_leaves,
                         min_child_samples=min_child_samples, colsample_bytree=colsample_bytree,
                         subsample=subsample, subsample_freq=1, reg_lambda=reg_lambda, max_bin=max_bin,
                         num_threads=1, verbose=-1, random_state=42)
    return PerLabel(gbm, min_positives=min_positives)


def build_head(name: str, params: dict[str, Any]) -> Any:
    """A head estimator from :data:`HEADS`, with a clear error for a wrong option."""
    try:
        return HEADS.get(name)(**params)
    except TypeError as e:
        raise UserError(f"head '{name}': {e}") from e


# ---------------------------------------------------------------------------- features


def require(comp: Competition, modality: str, who: str) -> None:
    """Fail clearly when a member needs captions or images the data config does not have."""
    have = {"text": comp.has_captions, "image": comp.has_images}[modality]
    if not have:
        what = "caption column (data.caption_col)" if modality == "text" else "image folder (data.image_dir)"
        raise UserError(f"{who} needs a {what}, but data '{comp.cfg.name}' has none")


def tfidf_vectorizer(word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] | None = (2, 5),
                     min_df: int = 2, max_features: int | None = None) -> FeatureUnion:
    """Word and char-n-gram TF-IDF side by side (char n-grams catch typos and word pieces)."""
    parts = [("word", TfidfVectorizer(ngram_range=tuple(word_ngrams), min_df=min_df, sublinear_tf=True,
                                      max_features=max_features, token_pattern=r"(?u)\b\w+\b"))]
    if char_ngrams:
        parts.append(("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams), min_df=min_df,
                                              sublinear_tf=True, max_features=max_features)))
    return FeatureUnion(parts)


class Split:
    """Row selections of one fold: the train rows, the scored rows and the test set."""

    def __init__(self, comp: Competition, train_idx: np.ndarray, valid_idx: np.ndarray) -> None:
        self.comp = comp
        self.train_idx = np.asarray(train_idx)
        self.valid_idx = np.asarray(valid_idx)
        self.has_test = comp.test is not None

    def captions(self) -> tuple[list[str], list[str], list[str] | None]:
        """Captions of train rows, scored rows and test rows."""
        cap = self.comp.train["caption"].to_numpy()
        test = self.comp.test["caption"].tolist() if self.has_test else None
        return cap[self.train_idx].tolist(), cap[self.valid_idx].tolist(), test

    def rows(self, full_train: Any, full_test: Any | None) -> tuple[Any, Any, Any | None]:
        """Slice a whole-train feature matrix into (train, valid) and pass test through."""
        return full_train[self.train_idx], full_train[self.valid_idx], full_test


Features = tuple[Any, Any, Any | None, dict[str, Any]]


def fit_tfidf(split: Split, opts: dict[str, Any]) -> FeatureUnion:
    """The TF-IDF vectoriser of one fold: vocabulary and idf from its training captions only."""
    require(split.comp, "text", "tfidf features")
    return tfidf_vectorizer(**opts).fit(split.captions()[0])


def tfidf_features(split: Split, opts: dict[str, Any]) -> Features:
    """TF-IDF fitted on the training fold's captions only (vocabulary and idf)."""
    tr, va, te = split.captions()
    vec = fit_tfidf(split, opts)
    out = vec.transform(tr), vec.transform(va), None if te is None else vec.transform(te)
    return (*out, {"tfidf_features": int(out[0].shape[1])})


def embedding_features(split: Split, encoders: list[str], settings: dict[str, dict]) -> Features:
    """Cached frozen-encoder embeddings of every encoder, concatenated."""
    from mmfold.cpu.encoders import build_encoder, embed

    if not encoders:
        raise UserError("frozen_embed needs at least one encoder in model.params.encoders")
    parts_tr, parts_te = [], []
    for name in encoders:
        enc = build_encoder(name, **settings.get(name, {}))
        require(split.comp, enc.modality, f"encoder {name}")
        parts_tr.append(embed(split.comp, "train", name, **settings.get(name, {})))
        parts_te.append(embed(split.comp, "test", name, **settings.get(name, {})) if split.has_test else None)
    full_te = np.hstack(parts_te) if split.has_test else None
    return (*split.rows(np.hstack(parts_tr), full_te), {"embedding_dim": sum(p.shape[1] for p in parts_tr)})


def svd_features(split: Split, opts: dict[str, Any], dim: int) -> Features:
    """TF-IDF -> truncated SVD, both fitted on the training fold only (dense, tree-friendly)."""
    tr, va, te, info = tfidf_features(split, opts)
    svd = TruncatedSVD(n_components=min(dim, tr.shape[1] - 1), random_state=42).fit(tr)
    out = svd.transform(tr), svd.transform(va), None if te is None else svd.transform(te)
    return (*out, {**info, "svd_dim": int(svd.n_components)})


def standardize(tr: np.ndarray, va: np.ndarray, te: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Zero-mean unit-variance per feature, statistics from the training fold only.

    Concatenated encoders live on different scales (unit-norm MiniLM vs non-negative
    EfficientNet activations); one C then fits both.
    """
    sc = StandardScaler().fit(tr)
    return sc.transform(tr), sc.transform(va), None if te is None else sc.transform(te)


def reduce_dense(dense: tuple[np.ndarray, np.ndarray, np.ndarray | None], pca_dim: int | None,
                 weight: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """PCA to ``pca_dim`` components, then scale so the mean training row norm is ``weight``.

    Both fitted on the training fold only. Next to unit-norm TF-IDF rows, 1,664 standardized
    embedding dims (row norm ~40) swamp the words under one C; scaled to norm ~1 the two views
    share the regularisation. PCA also keeps a sparse-solver fit at seconds, not minutes:
    liblinear's cost grows with the non-zeros, and a dense block makes every entry one.
    """
    tr, va, te = dense
    k = min(int(pca_dim or tr.shape[1]), tr.shape[0])  # no more components than training rows
    if k < tr.shape[1]:
        from sklearn.decomposition import PCA

        pca = PCA(k, random_state=0).fit(tr)
        tr, va, te = pca.transform(tr), pca.transform(va), None if te is None else pca.transform(te)
    if weight:
        scale = float(weight) / max(float(np.sqrt((tr ** 2).sum(1).mean())), 1e-12)
        tr, va, te = tr * scale, va * scale, None if te is None else te * scale
    return tr, va, te


# ----------------------------------------------------------------------------- members


def fit_head(head: Any, split: Split, tr: Any, va: Any, te: Any | None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Fit ``head`` on the training rows; predict the scored rows and the test set."""
    y = split.comp.y()
    start = time.perf_counter()
    head.fit(tr, y[split.train_idx])
    fit_s = time.perf_counter() - start
    p_va = _clip(head.predict_proba(va))
    p_te = None if te is None else _clip(head.predict_proba(te))
    const = [split.comp.classes[j] for j in getattr(head, "constant_labels_", [])]
    return p_va, p_te, {"head_fit_s": round(fit_s, 2), "n_features": int(tr.shape[1]), "prior_only_labels": const}


def _clip(p: np.ndarray) -> np.ndarray:
    """float32 probabilities in [0, 1] (guards against solver round-off)."""
    return np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)


def _finish(split: Split, head_name: str, head: Any, feats: Features, params: dict) -> MemberOutput:
    """Shared tail of every member: fit the head, merge the info dicts."""
    tr, va, te, finfo = feats
    p_va, p_te, hinfo = fit_head(head, split, tr, va, te)
    return p_va, p_te, {"head": head_name, "params": params, **finfo, **hinfo}


TFIDF_DEFAULTS: dict[str, Any] = {
    "word_ngrams": [1, 2], "char_ngrams": [2, 5], "min_df": 2, "max_features": None,
    "head": "logreg", "head_params": {"C": 2.0, "solver": "liblinear", "dual": True},
}


@MEMBERS.register("tfidf_linear")
def tfidf_linear(cfg: Config, comp: Competition, train_idx: np.ndarray, valid_idx: np.ndarray) -> MemberOutput:
    """Caption TF-IDF (word + char n-grams) and a per-label linear model (logreg or calibrated SVM)."""
    p = resolve_params(cfg, TFIDF_DEFAULTS)
    split = Split(comp, train_idx, valid_idx)
    opts = {k: p[k] for k in ("word_ngrams", "char_ngrams", "min_df", "max_features")}
    feats = tfidf_features(split, opts)
    return _finish(split, p["head"], build_head(p["head"], _sub(p, "head_params")), feats, p)


EMBED_DEFAULTS: dict[str, Any] = {
    "encoders": ["minilm"], "encoder_settings": {}, "standardize": True, "pca_dim": None,
    "dense_weight": None, "tfidf": False, "tfidf_params": {}, "head": "logreg", "head_params": {"C": 0.05},
}


@MEMBERS.register("frozen_embed")
def frozen_embed(cfg: Config, comp: Competition, train_idx: np.ndarray, valid_idx: np.ndarray) -> MemberOutput:
    """Frozen encoder embeddings (text, image or both) and a per-fold head (logreg or MLP).

    With ``tfidf: true`` the fold's TF-IDF is appended (sparse) so a linear head sees exact
    words as well as the encoder's meaning: useful for product names and rare terms.
    ``pca_dim`` and ``dense_weight`` (see :func:`reduce_dense`) let one C serve both blocks.
    """
    p = resolve_params(cfg, EMBED_DEFAULTS)
    split = Split(comp, train_idx, valid_idx)
    tr, va, te, info = embedding_features(split, list(p["encoders"]), _sub(p, "encoder_settings"))
    if p["standardize"]:
        tr, va, te = standardize(tr, va, te)
    if p["pca_dim"] or p["dense_weight"]:
        tr, va, te = reduce_dense((tr, va, te), p["pca_dim"], p["dense_weight"])
        info["embedding_dim"] = int(tr.shape[1])
    if p["tfidf"]:
        tr, va, te, info = _append_tfidf(split, (tr, va, te), _sub(p, "tfidf_params"), info)
    return _finish(split, p["head"], build_head(p["head"], _sub(p, "head_params")), (tr, va, te, info), p)


def _append_tfidf(split: Split, dense: tuple, opts: dict[str, Any], info: dict) -> Features:
    """hstack dense features with the fold's sparse TF-IDF (CSR, for linear heads)."""
    s_tr, s_va, s_te, tinfo = tfidf_features(split, opts)
    tr, va, te = dense
    stack = lambda d, s: sp.hstack([sp.csr_matrix(d), s], format="csr")  # noqa: E731
    return stack(tr, s_tr), stack(va, s_va), None if te is None else stack(te, s_te), {**info, **tinfo}


LGBM_DEFAULTS: dict[str, Any] = {
    "encoders": ["minilm"], "encoder_settings": {}, "svd_dim": 64, "tfidf_params": {},
    "head_params": {},
}


@MEMBERS.register("lgbm")
def lgbm(cfg: Config, comp: Competition, train_idx: np.ndarray, valid_idx: np.ndarray) -> MemberOutput:
    """LightGBM per label on cached embeddings and/or the fold's TF-IDF SVD components.

    Trees see interactions a linear head misses, so the blend gains from the disagreement.
    ``svd_dim: 0`` drops the SVD block, ``encoders: []`` the embeddings.
    """
    p = resolve_params(cfg, LGBM_DEFAULTS)
    split = Split(comp, train_idx, valid_idx)
    blocks = _lgbm_blocks(split, p)
    if not blocks:
        raise UserError(f"model '{cfg.model.name}': lgbm has no features (encoders empty and svd_dim 0)")
    tr, va, te = (None if blocks[0][i] is None else np.hstack([b[i] for b in blocks]) for i in range(3))
    info = {k: v for b in blocks for k, v in b[3].items()}
    return _finish(split, "lgbm", build_head("lgbm", _sub(p, "head_params")), (tr, va, te, info), p)


def _lgbm_blocks(split: Split, p: dict[str, Any]) -> list[Features]:
    """The feature blocks lgbm was asked for, each (train, valid, test, info)."""
    blocks = []
    if p["encoders"]:
        blocks.append(embedding_features(split, list(p["encoders"]), _sub(p, "encoder_settings")))
    if p["svd_dim"]:
        blocks.append(svd_features(split, _sub(p, "tfidf_params"), int(p["svd_dim"])))
    return blocks


MEMBER_DEFAULTS: dict[str, dict[str, Any]] = {
    "tfidf_linear": TFIDF_DEFAULTS, "frozen_embed": EMBED_DEFAULTS, "lgbm": LGBM_DEFAULTS,
}


def validate_params(cfg: Config) -> None:
    """Every ``model.params`` key of a member, nested options included, checked up front.

    A typo must surface before a fold is moved aside or reported stale, not minutes into
    fitting: the head (and TF-IDF options) are built once here, cheaply, and thrown away.

    Raises:
        UserError: naming the model, the kind and the bad key.
    """
    p = resolve_params(cfg, MEMBER_DEFAULTS.get(cfg.model.kind, dict(cfg.model.params)))
    build_head(p.get("head", "lgbm"), _sub(p, "head_params"))
    for key in ("tfidf_params",):
        if key in p:
            try:
                tfidf_vectorizer(**_sub(p, key))
            except TypeError as e:
                raise UserError(f"model '{cfg.model.name}' ({cfg.model.kind}): model.params.{key}: {e}") from e


def modalities(cfg: Config) -> set[str]:
    """Which inputs (``text``/``image``) a member config reads: lets callers skip members
    that a data config cannot feed (e.g. image encoders on caption-only COMP5329)."""
    from mmfold.cpu.encoders import build_encoder

    p = cfg.model.params
    encs = p.get("encoders", ["minilm"]) if cfg.model.kind != "tfidf_linear" else []
    out = {build_encoder(e).modality for e in encs}
    uses_tfidf = cfg.model.kind == "tfidf_linear" or p.get("tfidf") or (cfg.model.kind == "lgbm" and p.get("svd_dim", 64))
    return out | ({"text"} if uses_tfidf else set())

