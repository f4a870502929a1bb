"""Member heads: multi-label estimators with ``fit(X, Y)`` / ``predict_proba(X) -> (n, L)``.

Registered in :data:`HEADS` by name, so a member config picks one with ``head: logreg``. Every
head is a scikit-learn estimator whose fitted state skops can store (a torch network is turned
into arrays and back, see :class:`TorchMLP`), so a fold's fitted member predicts a new test set
without refitting.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, clone

from mmfold.cpu.threads import available_cores, torch_threads
from mmfold.errors import UserError
from mmfold.registry import Registry

HEADS = Registry("member head")

# ------------------------------------------------------------------------------- heads


class PerLabel(BaseEstimator, ClassifierMixin):
    """One binary estimator per label; labels a training fold cannot learn get their prior.

    ``OneVsRestClassifier`` fits nothing sensible for a label with no (or too few) positives in
    a training fold (rare labels on 5 folds, or most COCO labels on 106 rows): here such a
    label predicts its training rate instead (0 when absent), and the fold still runs.

    Args:
        estimator: A binary classifier with ``predict_proba``; cloned per label.
        min_positives: Fewer positives (or negatives) than this -> prior.
        n_jobs: Labels fitted in parallel; None: one per core available to the process.
        prefer: ``"threads"`` (the solvers release the GIL) or ``"processes"``, for solvers
            with process-global state: liblinear shuffles with one generator per process, so
            labels fitted in threads at once draw from it in whatever order they run and the
            fold does not repeat (seen: 1e-5 between two identical tfidf_lr runs).
    """

    def __init__(self, estimator: Any, min_positives: int = 1, n_jobs: int | None = None,
                 prefer: str = "threads") -> None:
        self.estimator = estimator
        self.min_positives = min_positives
        self.n_jobs = n_jobs
        self.prefer = prefer

    def fit(self, X: Any, Y: np.ndarray) -> PerLabel:
        """Fit one clone per learnable label; set ``prior_`` and ``estimators_``."""
        from joblib import Parallel, delayed

        Y = np.asarray(Y)
        self.prior_ = Y.mean(0).astype(np.float32)
        pos = Y.sum(0)
        cols = [j for j in range(Y.shape[1]) if min(pos[j], len(Y) - pos[j]) >= self.min_positives]
        fitted = Parallel(n_jobs=self.n_jobs or available_cores(), prefer=self.prefer)(
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
            self.n_features_in_, self.n_outputs_, self.sparse_ = int(X.shape[1]), int(Y.shape[1]), sp.issparse(X)
            self.net_ = self._build_net()
            opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            steps = self.epochs * -(-X.shape[0] // self.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.1)
            yt = torch.as_tensor(Y, dtype=torch.float32)
            for _ in range(self.epochs):
                self._epoch(X, yt, opt, sched)
        self.net_.eval()
        return self

    def _build_net(self) -> Any:
        """An untrained network of the fitted shape (input width, labels, sparse or dense)."""
        return _MLPNet(self.n_features_in_, self.hidden, self.n_outputs_, sparse=self.sparse_,
                       p_in=self.input_dropout, p=self.dropout)

    def __getstate__(self) -> dict[str, Any]:
        """The estimator with its network as plain arrays: skops (and pickle) store those
        without touching torch's own pickling, which would run code on load."""
        state = dict(super().__getstate__())  # object.__getstate__ is the live __dict__: copy
        net = state.pop("net_", None)
        if net is not None:
            state["net_weights_"] = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the network from the stored arrays, in eval mode, bit-identical weights."""
        import torch

        state = dict(state)
        weights = state.pop("net_weights_", None)
        super().__setstate__(state)
        if weights is not None:
            self.net_ = self._build_net()
            self.net_.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
            self.net_.eval()

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


# query x bank similarities computed at once: 128 MiB per float64 array (a few such arrays live
# at once: the similarities, their negation, argpartition's indices)
KNN_BLOCK = 1 << 24


class KNNHead(BaseEstimator, ClassifierMixin):
    """Similarity-weighted label vote of the ``k`` nearest training rows.

    A different inductive bias from the linear and MLP heads (local, no decision boundary),
    so its errors differ and the blend gains. Exact search by matrix products in chunks:
    20k x 5k rows is a few seconds.

    Args:
        k: Neighbours per row.
        temperature: Softmax temperature over the neighbours' similarities (cosine, or minus
            the distance in the features' units).
        chunk: Query rows per matrix product at most (fewer against a bank so large that
            the block would pass :data:`KNN_BLOCK` similarities).
        metric: ``cosine`` (embeddings: rows L2-normalised) or ``euclidean`` (features whose
            scale means something, e.g. a row id in units of the typical gap between ids;
            float64, so ids in the tens of thousands keep their last digit).
    """

    def __init__(self, k: int = 30, temperature: float = 0.05, chunk: int = 2048, metric: str = "cosine") -> None:
        self.k = k
        self.temperature = temperature
        self.chunk = chunk
        self.metric = metric

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KNNHead:
        """Store the training rows (L2-normalised for cosine) and their labels."""
        self.X_ = self._rows(X)
        self.Y_ = np.asarray(Y, dtype=np.float32)
        return self

    def _rows(self, X: np.ndarray) -> np.ndarray:
        """Rows as the metric compares them."""
        from sklearn.preprocessing import normalize

        if self._metric() == "euclidean":
            return np.asarray(X, dtype=np.float64)
        return normalize(np.asarray(X, dtype=np.float32))

    def _metric(self) -> str:
        """The metric, checked (``getattr``: files saved before it existed are cosine)."""
        metric = getattr(self, "metric", "cosine")
        if metric not in ("cosine", "euclidean"):
            raise UserError(f"knn head: metric '{metric}' is not one of cosine, euclidean")
        return metric

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, L)`` weighted label frequencies among the neighbours."""
        Xn = self._rows(X)
        k = min(self.k, len(self.X_))
        step = max(1, min(self.chunk, KNN_BLOCK // max(len(self.X_), 1)))  # a block of queries x bank stays small
        bank = np.asarray(self.X_, dtype=np.float64)  # see _similarity
        parts = [self._vote(Xn[i : i + step], bank, k) for i in range(0, len(Xn), step)]
        return np.concatenate(parts) if parts else np.zeros((0, self.Y_.shape[1]), np.float32)

    def _similarity(self, q: np.ndarray, bank: np.ndarray) -> np.ndarray:
        """Cosine similarity, or minus the euclidean distance, of each query to every row.

        Cosine sums float32 products in float64 and rounds back: BLAS sums a row's products
        in an order that depends on where the row sits in the block (seen: a reversed test
        set moved probabilities by an ulp), and float64 makes that order invisible after
        rounding, so a row scores the same in any test set. Costs about 3x the float32
        product, still seconds a fold."""
        if self._metric() == "cosine":
            return (np.asarray(q, dtype=np.float64) @ bank.T).astype(np.float32)
        if q.shape[1] == 1:  # one feature (a row id): exact, no cancellation in |q|^2 - 2qx + |x|^2
            return -np.abs(q - bank.T)
        sq = (q ** 2).sum(1)[:, None] - 2 * q @ bank.T + (bank ** 2).sum(1)[None, :]
        return -np.sqrt(np.maximum(sq, 0.0))

    def _vote(self, q: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
        """Softmax-weighted labels of each query row's top-k neighbours in ``bank`` (``X_``)."""
        sim = self._similarity(q, bank)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, top, axis=1) / self.temperature
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return np.einsum("nk,nkl->nl", w, self.Y_[top]).astype(np.float32)


@HEADS.register("knn")
def knn_head(**params: Any) -> KNNHead:
    """k-nearest-neighbour label vote, cosine or euclidean (:class:`KNNHead`)."""
    return KNNHead(**params)


@HEADS.register("logreg")
def logreg_head(C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000, dual: bool = False,
                class_weight: str | None = None, min_positives: int = 1, random_state: int = 0) -> PerLabel:
    """Per-label L2 logistic regression: fast, calibrated enough to threshold and blend.

    For sparse TF-IDF (features > rows) use ``solver: liblinear, dual: true``: same optimum,
    about 4x less CPU than the primal solvers. liblinear shuffles its coordinates: seeded, and
    its labels fitted in processes (:class:`PerLabel`), so a fold repeats bit for bit.
    """
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, solver=solver, max_iter=max_iter, dual=dual, class_weight=class_weight,
                            random_state=random_state)
    return PerLabel(lr, min_positives=min_positives, prefer=_liblinear_prefers(solver))


def _liblinear_prefers(solver: str) -> str:
    """How :class:`PerLabel` runs a solver's labels at once: liblinear's process-global
    generator wants processes; the rest run in threads."""
    return "processes" if solver == "liblinear" else "threads"


@HEADS.register("svm")
def svm_head(C: float = 0.1, cv: int = 3, min_positives: int = 3) -> PerLabel:
    """Per-label linear SVM, sigmoid-calibrated by inner CV on the training fold only.

    Inner CV needs a positive in every inner split, hence ``min_positives`` >= ``cv``.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    svm = CalibratedClassifierCV(LinearSVC(C=C, random_state=0), cv=cv, method="sigmoid")  # liblinear
    return PerLabel(svm, min_positives=max(min_positives, cv), prefer=_liblinear_prefers("liblinear"))


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
