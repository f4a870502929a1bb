"""Predict a test set from a fold's saved model, training nothing: the torch side of
``mmfold predict`` and of an exported bundle.

A fold's ``best.pt`` holds the weights its predictions came from, the resolved config and the
caption tokenizer's state (the LSTM's word vocabulary was fitted on that fold's training
captions, which a new test set, or a bundle without ``train.csv``, no longer has). Inference
runs the same code as training's final prediction (:func:`mmfold.train.loop.predict` over
canonical batches), so a test row gets exactly the probability the training run gave it,
whatever other rows the new test set holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmfold import hints
from mmfold.artifacts.manifest import portable_view
from mmfold.config import Config, describe_diff, learning_diff
from mmfold.cpu.threads import torch_threads
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.train.batches import build_test_data, make_loader
from mmfold.train.checkpoint import load_checkpoint
from mmfold.train.optim import make_accelerator

__all__ = ["predict_fold", "best_checkpoint"]


def best_checkpoint(run_dir: Path, cfg: Config) -> dict:
    """``run_dir/best.pt``, checked to be a model trained with ``cfg``'s learning settings.

    Raises:
        UserError: the file is missing, or it was trained with other settings.
    """
    path = Path(run_dir) / "best.pt"
    if not path.exists():
        raise UserError(f"{path} missing: fold {run_dir.name} has no saved model; retrain it "
                        f"({hints.make('train', cfg.data.name, model=cfg.model.name, fold=int(run_dir.name.removeprefix('fold')), force=True)})")
    ck = load_checkpoint(path)
    changed = learning_diff(portable_view(ck["config"]), portable_view(cfg.to_dict()))
    if changed:
        raise UserError(f"{path} was trained with other settings:\n{describe_diff(changed, 'checkpoint', 'now')}")
    if "tokenizer" not in ck:
        raise UserError(f"{path} was saved before checkpoints kept their tokenizer; retrain the fold "
                        f"({hints.make('train', cfg.data.name, model=cfg.model.name, force=True)})")
    return ck


def predict_fold(cfg: Config, comp: Competition, run_dir: Path) -> np.ndarray:
    """Probabilities ``(n_test, L)`` of ``comp``'s test rows from the fold's ``best.pt``.

    Builds the model (its frozen prefixes' caches for this test set included), loads the
    saved weights and tokenizer, and predicts with the fold's TTA. ``comp`` needs no train rows.
    """
    from mmfold.models import build_model, parse_params
    from mmfold.models.tokenizers import tokenizer_from_state
    from mmfold.train.loop import predict

    t = cfg.train
    ck = best_checkpoint(run_dir, cfg)
    with torch_threads(t.threads):
        acc = make_accelerator(t)
        model = build_model(cfg, comp.classes, pretrained=False)  # best.pt holds every weight
        model.load_state_dict(ck["model"])
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        tok = tokenizer_from_state(parse_params(cfg), ck["tokenizer"])
        with acc.main_process_first():
            data = build_test_data(cfg, comp, model, tok, acc.device)
        loader = make_loader(data.test, t.batch_size * 2, shuffle=False, num_workers=t.num_workers, seed=t.seed,
                             pin_memory=acc.device.type == "cuda")
        model, loader = acc.prepare(model, loader)
        return predict(model, loader, data, acc, tta=t.tta, channels_last=t.channels_last)
