"""CPU-fast members: TF-IDF + linear, frozen-encoder embeddings + head, LightGBM.

A member kind is a builder ``fn(cfg, comp) -> MemberModel`` registered in :data:`MEMBERS`.
:func:`fit_member_fold` fits it on a fold's training rows, scores the fold and the test set,
and stores the fitted model as ``member.skops`` in the fold's run dir, so ``mmfold train``
writes the same OOF/test files as the torch engine (the blender cannot tell them apart) and
``mmfold predict`` (:func:`predict_member_fold`) scores a new test set without refitting.

A member is feature *blocks* (:mod:`mmfold.cpu.features`) + a *head*
(:mod:`mmfold.cpu.heads`). Blocks that learn anything from data (TF-IDF vocabulary and idf,
SVD, scaler, PCA) are fitted on the training rows only, never on the fold being scored;
frozen encoder embeddings learn nothing from the labels, so they are computed once and cached
(:mod:`mmfold.cpu.encoders`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, clone

from mmfold import hints
from mmfold.config import Config
from mmfold.cpu.features import (
    EmbedBlock,
    EncoderSpec,
    IdBlock,
    MemberInput,
    SvdBlock,
    TfidfBlock,
    member_input,
    require,
    tfidf_vectorizer,
)
from mmfold.cpu.heads import HEADS, KNNHead, PerLabel, TorchMLP, build_head  # noqa: F401 - the heads' home
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.registry import Registry

log = logging.getLogger(__name__)

MEMBERS = Registry("CPU member kind")
MEMBER_FILE = "member.skops"
PREDICT_ROWS = 512  # rows per prediction block, always full (see MemberModel.predict_proba)

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


# ------------------------------------------------------------------------------- model


class MemberModel(BaseEstimator, ClassifierMixin):
    """Feature blocks side by side, then a multi-label head: one fold's whole fitted member.

    Sparse blocks (TF-IDF) make the feature matrix CSR (dense blocks first), for linear heads;
    all-dense blocks are concatenated as arrays.

    Args:
        blocks: Unfitted feature blocks; cloned at fit.
        head: An unfitted head estimator; cloned at fit.
        head_name: Its :data:`HEADS` name, for the fold's info.
    """

    def __init__(self, blocks: list[Any] | None = None, head: Any = None, head_name: str = "") -> None:
        self.blocks = blocks
        self.head = head
        self.head_name = head_name

    def needed_encoders(self) -> list[EncoderSpec]:
        """The (encoder, settings) embeddings the blocks read, each once."""
        out: list[EncoderSpec] = []
        for b in self.blocks or []:
            out += [e for e in b.needed_encoders() if e not in out]
        return out

    def fit(self, inp: MemberInput, Y: np.ndarray) -> MemberModel:
        """Fit the blocks on ``inp``, then the head on their features and 0/1 ``Y``."""
        self.blocks_ = [clone(b) for b in self.blocks or []]
        X = _side_by_side([b.fit_transform(inp) for b in self.blocks_])
        start = time.perf_counter()
        self.head_ = clone(self.head).fit(X, Y)
        self.n_labels_ = int(np.shape(Y)[1])
        self.info_ = {"head": self.head_name, "head_fit_s": round(time.perf_counter() - start, 2),
                      "n_features": int(X.shape[1]), **{k: v for b in self.blocks_ for k, v in b.info_.items()}}
        return self

    def features(self, inp: MemberInput) -> Any:
        """The head's input for the rows of ``inp``."""
        return _side_by_side([b.transform(inp) for b in self.blocks_])

    def predict_proba(self, inp: MemberInput) -> np.ndarray:
        """``(n, L)`` float32 probabilities in [0, 1] (clipped against solver round-off).

        Rows go through in blocks of exactly :data:`PREDICT_ROWS` (the last one padded with
        repeats of its last row, dropped after): BLAS picks kernels and summation order by
        matrix shape, so a PCA or a dense head would otherwise give a row a few ulps more or
        less depending on how many rows came with it. With one shape, a row of a new test set
        gets the very numbers it got in training."""
        n, parts = len(inp.ids), []
        for start in range(0, n, PREDICT_ROWS):
            rows = np.arange(start, min(start + PREDICT_ROWS, n))
            padded = np.concatenate([rows, np.full(PREDICT_ROWS - len(rows), rows[-1])])
            p = self.head_.predict_proba(self.features(inp.take(padded)))
            parts.append(np.asarray(p, dtype=np.float32)[: len(rows)])
        out = np.concatenate(parts) if parts else np.zeros((0, self.n_labels_), np.float32)
        return np.clip(out, 0.0, 1.0)


def _side_by_side(parts: list[Any]) -> Any:
    """Blocks' features as one matrix: CSR if any block is sparse (dense blocks first)."""
    if len(parts) == 1:
        return parts[0]
    if any(sp.issparse(p) for p in parts):
        return sp.hstack([sp.csr_matrix(p) for p in parts], format="csr")
    return np.hstack(parts)


def trusted_types() -> list[str]:
    """Fully qualified names of every type a fitted member may contain beyond skops'
    defaults; a member file asking for anything else is refused at load."""
    from mmfold.artifacts.fitted import LIGHTGBM_TYPES
    from mmfold.cpu.features import TRUSTED_TYPES as BLOCKS

    ours = [f"{c.__module__}.{c.__qualname__}" for c in (MemberModel, PerLabel, TorchMLP, KNNHead)]
    sklearn_private = ["sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration"]
    return [*ours, *BLOCKS, *LIGHTGBM_TYPES, *sklearn_private]


# ----------------------------------------------------------------------------- members

TFIDF_DEFAULTS: dict[str, Any] = {
    "word_ngrams": [1, 2], "char_ngrams": [2, 5], "min_df": 2, "max_features": None,
    "head": "logreg", "head_params": {"C": 2.0, "solver": "liblinear", "dual": True},
}
TFIDF_OPTS = ("word_ngrams", "char_ngrams", "min_df", "max_features")


@MEMBERS.register("tfidf_linear")
def tfidf_linear(cfg: Config, comp: Competition) -> MemberModel:
    """Caption TF-IDF (word + char n-grams) and a per-label linear model (logreg or calibrated SVM)."""
    p = resolve_params(cfg, TFIDF_DEFAULTS)
    require(comp, "text", "tfidf features")
    block = TfidfBlock({k: p[k] for k in TFIDF_OPTS})
    return MemberModel([block], build_head(p["head"], _sub(p, "head_params")), p["head"])


EMBED_DEFAULTS: dict[str, Any] = {
    "encoders": ["minilm"], "encoder_settings": {}, "standardize": True, "pca_dim": None,
    "dense_weight": None, "tfidf": False, "tfidf_params": {}, "head": "logreg", "head_params": {"C": 0.05},
    "block_norm": False,
}


@MEMBERS.register("frozen_embed")
def frozen_embed(cfg: Config, comp: Competition) -> MemberModel:
    """Frozen encoder embeddings (text, image or both) and a per-fold head (logreg or MLP).

    With ``tfidf: true`` the fold's TF-IDF is appended (sparse) so a linear head sees exact
    words as well as the encoder's meaning: useful for product names and rare terms.
    ``pca_dim`` and ``dense_weight`` (see :class:`~mmfold.cpu.features.DenseReducer`) let one
    C serve both blocks.
    """
    p = resolve_params(cfg, EMBED_DEFAULTS)
    if not p["encoders"]:
        raise UserError("frozen_embed needs at least one encoder in model.params.encoders")
    blocks: list[Any] = [EmbedBlock(list(p["encoders"]), _sub(p, "encoder_settings"), bool(p["standardize"]),
                                    p["pca_dim"], p["dense_weight"], bool(p["block_norm"]))]
    if p["tfidf"]:
        require(comp, "text", "tfidf features")
        blocks.append(TfidfBlock(_sub(p, "tfidf_params")))
    return MemberModel(blocks, build_head(p["head"], _sub(p, "head_params")), p["head"])


LGBM_DEFAULTS: dict[str, Any] = {
    "encoders": ["minilm"], "encoder_settings": {}, "svd_dim": 64, "tfidf_params": {},
    "head_params": {},
}


@MEMBERS.register("lgbm")
def lgbm(cfg: Config, comp: Competition) -> MemberModel:
    """LightGBM per label on cached embeddings and/or the fold's TF-IDF SVD components.

    Trees see interactions a linear head misses, so the blend gains from the disagreement.
    ``svd_dim: 0`` drops the SVD block, ``encoders: []`` the embeddings.
    """
    p = resolve_params(cfg, LGBM_DEFAULTS)
    blocks: list[Any] = []
    if p["encoders"]:
        blocks.append(EmbedBlock(list(p["encoders"]), _sub(p, "encoder_settings")))
    if p["svd_dim"]:
        require(comp, "text", "tfidf features")
        blocks.append(SvdBlock(_sub(p, "tfidf_params"), int(p["svd_dim"])))
    if not blocks:
        raise UserError(f"model '{cfg.model.name}': lgbm has no features (encoders empty and svd_dim 0)")
    return MemberModel(blocks, build_head("lgbm", _sub(p, "head_params")), "lgbm")


ID_KNN_DEFAULTS: dict[str, Any] = {
    "pattern": r"\d+", "head": "knn", "head_params": {"k": 10, "temperature": 5.0, "metric": "euclidean"},
}


@MEMBERS.register("id_knn")
def id_knn(cfg: Config, comp: Competition) -> MemberModel:
    """Label vote of the rows whose id numbers are nearest (:class:`~mmfold.cpu.features.IdBlock`).

    Reads no caption and no pixel: where ids were issued over time, neighbours share
    time-bound labels (a catalogue's season). Weak on the rest, so it pays through a blender
    that weighs it per label (``blend.method=logistic``), not through one global weight.
    """
    p = resolve_params(cfg, ID_KNN_DEFAULTS)
    knn_defaults = ID_KNN_DEFAULTS["head_params"] if p["head"] == "knn" else {}  # a euclidean vote unless told
    head_params = {**knn_defaults, **_sub(p, "head_params")}
    return MemberModel([IdBlock(str(p["pattern"]))], build_head(p["head"], head_params), p["head"])


STUDENT_DEFAULTS: dict[str, Any] = {"base": None, "teachers": [], "distill": 0.5, "pseudo": False,
                                    "pseudo_teachers": None}


@MEMBERS.register("student")
def student(cfg: Config, comp: Competition) -> MemberModel:
    """Another member (``base``: a model config name) trained on soft targets made by
    ``teachers`` (:mod:`mmfold.train.students` makes them without fold leakage): its train
    rows' labels mixed with the teachers' probabilities (``distill``: the teachers' share),
    and with ``pseudo`` the test rows, labelled by the fold models of ``pseudo_teachers``
    (default: ``teachers``; CPU members). The head must learn from soft targets (``mlp``)."""
    base = student_base(cfg)
    model = MEMBERS.get(base.model.kind)(base, comp)
    if not isinstance(model.head, TorchMLP):
        raise UserError(f"model '{cfg.model.name}' (student): base '{base.model.name}' has head "
                        f"'{model.head_name}', which needs 0/1 labels; a student needs head: mlp")
    return model


def student_base(cfg: Config) -> Config:
    """The config of a student's ``base`` model, with the student's data section."""
    from mmfold.config import load_config

    p = resolve_params(cfg, STUDENT_DEFAULTS)
    if not p["base"] or not p["teachers"]:
        raise UserError(f"model '{cfg.model.name}' (student) needs model.params.base (a model name) "
                        "and model.params.teachers (model names)")
    base = load_config(cfg.source or cfg.data.name, p["base"], [])
    if base.model.kind not in MEMBER_DEFAULTS:
        raise UserError(f"model '{cfg.model.name}' (student): base '{p['base']}' is a {base.model.kind}, "
                        f"not a CPU member ({sorted(MEMBER_DEFAULTS)})")
    base.data = cfg.data
    return base


MEMBER_DEFAULTS: dict[str, dict[str, Any]] = {
    "tfidf_linear": TFIDF_DEFAULTS, "frozen_embed": EMBED_DEFAULTS, "lgbm": LGBM_DEFAULTS,
    "id_knn": ID_KNN_DEFAULTS,
}


def validate_params(cfg: Config) -> None:
    """Every ``model.params`` key of a member, nested options included, checked up front.

    A typo must surface before a fold is moved aside or reported stale, not minutes into
    fitting: the head (and TF-IDF options) are built once here, cheaply, and thrown away.

    Raises:
        UserError: naming the model, the kind and the bad key.
    """
    if cfg.model.kind == "student":
        return validate_params(student_base(cfg))
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

    if cfg.model.kind == "student":
        return modalities(student_base(cfg))
    p = cfg.model.params
    encs = p.get("encoders", MEMBER_DEFAULTS.get(cfg.model.kind, {}).get("encoders", []))
    out = {build_encoder(e).modality for e in encs}
    uses_tfidf = cfg.model.kind == "tfidf_linear" or p.get("tfidf") or (cfg.model.kind == "lgbm" and p.get("svd_dim", 64))
    return out | ({"text"} if uses_tfidf else set())


def encoder_needs(cfg: Config) -> list[Any]:
    """The weights (:class:`mmfold.hub.Need`) of every frozen encoder a member embeds with,
    found without loading any: what ``make weights`` fetches and training checks first."""
    from mmfold.cpu.encoders import build_encoder

    if cfg.model.kind == "student":
        return encoder_needs(student_base(cfg))
    p = cfg.model.params
    encs = p.get("encoders", MEMBER_DEFAULTS.get(cfg.model.kind, {}).get("encoders", []))
    settings = dict(p.get("encoder_settings") or {})
    return [build_encoder(e, **dict(settings.get(e) or {})).need for e in encs]


def encoder_records(specs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, str]]:
    """What each frozen encoder's weights resolved to (repo, commit, file hash), for ``done.json``:
    freshness then treats moved weights as a changed config."""
    from mmfold.cpu.encoders import build_encoder

    return [build_encoder(name, **settings).resolved().record() for name, settings in specs]


# ------------------------------------------------------------------------------- folds


class SoftTargets:
    """What a student learns from instead of 0/1 labels: ``train`` ``(n_train, L)`` soft
    targets of the fold's train rows, and ``test`` ``(n_test, L)`` pseudo-labels of the test
    rows (None: no pseudo-labelling)."""

    def __init__(self, train: np.ndarray, test: np.ndarray | None = None) -> None:
        self.train = train
        self.test = test

    def rows(self, train_rows: MemberInput, test_rows: MemberInput | None) -> tuple[MemberInput, np.ndarray]:
        """The rows to fit on and their targets (train rows, then pseudo-labelled test rows)."""
        if self.test is None:
            return train_rows, self.train
        return train_rows.concat(test_rows), np.vstack([self.train, self.test])


def fit_member_fold(cfg: Config, comp: Competition, train_idx: np.ndarray, valid_idx: np.ndarray,
                    run_dir: Path | None = None, targets: SoftTargets | None = None) -> MemberOutput:
    """Fit the member on ``train_idx``; score ``valid_idx`` and the test set; keep the model.

    The test probabilities come from the same :meth:`MemberModel.predict_proba` that
    :func:`predict_member_fold` runs on the stored model, so re-predicting the training-time
    test set reproduces them exactly.

    Args:
        cfg: The member's config.
        comp: The competition.
        train_idx: Rows the member learns from.
        valid_idx: Rows it scores (out of fold).
        run_dir: Where ``member.skops`` goes (None: not stored, e.g. in a quick study).
        targets: A student's soft targets for ``train_idx`` (and the test rows it also
            learns from); None: the 0/1 labels.

    Returns:
        ``(valid_probs, test_probs or None, info)``.
    """
    from mmfold.artifacts import fitted

    model = MEMBERS.get(cfg.model.kind)(cfg, comp)
    inp = member_input(comp, "train", model.needed_encoders())
    test_inp = None if comp.test is None else member_input(comp, "test", model.needed_encoders())
    rows, Y = inp.take(np.asarray(train_idx)), comp.y()[train_idx]
    if targets is not None:
        rows, Y = targets.rows(rows, test_inp)
    model.fit(rows, Y)
    p_va = model.predict_proba(inp.take(np.asarray(valid_idx)))
    if run_dir is not None:
        fitted.save(model, Path(run_dir) / MEMBER_FILE)
    p_te = None if test_inp is None else model.predict_proba(test_inp)
    params = resolve_params(cfg, MEMBER_DEFAULTS.get(cfg.model.kind, dict(cfg.model.params)))
    const = [comp.classes[j] for j in getattr(model.head_, "constant_labels_", [])]
    weights = encoder_records(model.needed_encoders())
    return p_va, p_te, {"params": params, **model.info_, "prior_only_labels": const,
                        **({"weights": weights} if weights else {})}


def load_member(run_dir: Path) -> MemberModel:
    """A fold's fitted member, loaded with skops trusting only the types members are made of.

    Raises:
        UserError: no ``member.skops`` (trained before members kept their state: retrain the
            fold), or a file asking for any other type (nothing is loaded).
    """
    from mmfold.artifacts import fitted

    path = Path(run_dir) / MEMBER_FILE
    if not path.exists():
        rd = Path(run_dir)  # runs/<data>/<model>/fold<k>
        fold = rd.name.removeprefix("fold")
        again = hints.make("train", rd.parent.parent.name, model=rd.parent.name,
                           fold=int(fold) if fold.isdigit() else None, force=True)
        raise UserError(f"{path} not found: this fold was trained before CPU members kept their fitted "
                        f"state; retrain it ({again}) to predict new test sets")
    model = fitted.load(path, trusted_types(), "fitted member")
    if not isinstance(model, MemberModel):
        raise UserError(f"{path} holds a {type(model).__name__}, not a fitted member")
    return model


def predict_member_fold(cfg: Config, comp: Competition, run_dir: Path, split: str = "test") -> np.ndarray:
    """Probabilities of every row of ``split`` from the fold's stored member (no refit)."""
    model = load_member(run_dir)
    return model.predict_proba(member_input(comp, split, model.needed_encoders()))
