"""``make bench`` section "deep_speed": training samples/s of fine-tuned MiniLM on comp5329
captions, batches of similar caption length (``train.length_buckets``) vs a plain shuffle.

Both sides train the same model (``configs/models/minilm_ft.yaml``, the same initial weights)
for the same number of optimizer steps on the same captions, through the engine's own dataset,
loader, optimizer and loss; only the batch sampler differs. The runs alternate (shuffle,
buckets, shuffle, buckets) so a neighbour's load on the shared CPU hits both sides alike.
:func:`train_samples_per_s` is also how the per-fold costs in the ``*_ft`` configs were measured.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import numpy as np

from mmfold.config import Config
from mmfold.data.competition import Competition


def train_samples_per_s(cfg: Config, comp: Competition, steps: int, *, warmup: int = 2,
                        model: Any = None) -> dict[str, float]:
    """Time ``steps`` training steps (after ``warmup`` untimed ones) of ``cfg``'s model on
    every row of ``comp``, with the backbone trainable (the fine-tuning phase).

    Args:
        model: A model built for ``cfg`` to train a copy of (same initial weights across
            calls), or None to build one.

    Returns:
        ``samples_per_s``, ``s_per_step``, ``tokens_per_row`` (mean trimmed batch length; 0
        without captions), ``padding`` (share of token slots that are padding) and ``threads``.
    """
    import torch

    from mmfold.cpu.threads import torch_threads
    from mmfold.models import build_model
    from mmfold.train.batches import build_data, fold_loaders, model_inputs
    from mmfold.train.losses import build_loss, pos_weight_from_labels
    from mmfold.train.optim import build_optimizer

    t = cfg.train
    with torch_threads(t.threads):
        torch.manual_seed(t.seed)
        net = copy.deepcopy(model) if model is not None else build_model(cfg, comp.classes)
        rows = np.arange(len(comp.train))
        data = build_data(cfg, comp, net, rows, rows[:2])
        loader = fold_loaders(data, t, pin_memory=False)[0]
        opt = build_optimizer(net, t)
        loss_fn = build_loss(t, pos_weight_from_labels(comp.y()) if t.pos_weight else None)
        net.set_backbone_trainable(True)
        net.train()
        done = samples = slots = real = 0
        start = time.perf_counter()
        epoch = 0
        while done < warmup + steps:
            for part in (loader.batch_sampler, loader.sampler, data.train):  # as the engine's loop does
                if hasattr(part, "set_epoch"):
                    part.set_epoch(epoch)
            for batch in loader:
                if done == warmup:
                    start, samples, slots, real = time.perf_counter(), 0, 0, 0
                loss = loss_fn(net(model_inputs(batch, data)), batch["y"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip or 1e9)
                opt.step()
                opt.zero_grad(set_to_none=True)
                samples += len(batch["y"])
                if "attention_mask" in batch:
                    slots += batch["attention_mask"].numel()
                    real += int(batch["attention_mask"].sum())
                done += 1
                if done == warmup + steps:
                    break
            epoch += 1
        seconds = time.perf_counter() - start
        threads = torch.get_num_threads()
    return {"samples_per_s": samples / seconds, "s_per_step": seconds / steps,
            "tokens_per_row": slots / max(samples, 1), "padding": 1 - real / slots if slots else 0.0,
            "threads": threads}


def benchmark(quick: bool = False) -> dict[str, Any]:
    """MiniLM fine-tuning samples/s, length-bucketed vs plain-shuffled batches, as a ratio.

    comp5329 captions from ``../shared/data`` (the first 128 / 768 rows; ``quick``: 3 timed
    steps per run, else 12), two alternating runs per side. Needs ``make weights``.

    Returns:
        ``{"bucketed_samples_per_s", "shuffled_samples_per_s", "ratio", "padding_*", ...}``;
        ``skipped`` with a reason when the data or the weights are missing.
    """
    from pathlib import Path

    from mmfold.config import load_config
    from mmfold.data.competition import load_competition
    from mmfold.models import build_model
    from mmfold.models.base import project_path

    cfg = load_config("comp5329", "minilm_ft", ["train.progress=false"])
    if not (Path(cfg.data.root) / cfg.data.train_csv).exists():
        return {"skipped": f"no {cfg.data.root}/{cfg.data.train_csv}"}
    if not (project_path(cfg.model.params["text_model"]) / "config.json").exists():
        return {"skipped": "no weights/minilm: run `make weights`"}
    n, steps = (128, 3) if quick else (768, 12)
    full = load_competition(cfg.data, use_saved=False)
    comp = dataclasses.replace(full, train=full.train.iloc[:n].reset_index(drop=True), test=None)
    model = build_model(cfg, comp.classes)
    runs: dict[str, list[dict[str, float]]] = {"shuffled": [], "bucketed": []}
    for _ in range(2):
        for side, buckets in (("shuffled", 0), ("bucketed", cfg.train.length_buckets or 50)):
            side_cfg = copy.deepcopy(cfg)
            side_cfg.train.length_buckets = buckets
            runs[side].append(train_samples_per_s(side_cfg, comp, steps, model=model))
    rate = {s: float(np.mean([x["samples_per_s"] for x in r])) for s, r in runs.items()}
    ratio = rate["bucketed"] / rate["shuffled"]
    return {
        "data": cfg.data.name, "captions": n, "batch_size": cfg.train.batch_size, "steps_per_run": steps,
        "runs_per_side": 2, "length_buckets": cfg.train.length_buckets, "threads": runs["bucketed"][0]["threads"],
        "bucketed_samples_per_s": round(rate["bucketed"], 1), "shuffled_samples_per_s": round(rate["shuffled"], 1),
        "ratio": round(ratio, 2),
        "tokens_per_row_bucketed": round(float(np.mean([x["tokens_per_row"] for x in runs["bucketed"]])), 1),
        "tokens_per_row_shuffled": round(float(np.mean([x["tokens_per_row"] for x in runs["shuffled"]])), 1),
        "padding_bucketed": round(float(np.mean([x["padding"] for x in runs["bucketed"]])), 3),
        "padding_shuffled": round(float(np.mean([x["padding"] for x in runs["shuffled"]])), 3),
        "headline": f"{ratio:.2f}x samples/s ({rate['bucketed']:.0f} vs {rate['shuffled']:.0f}), MiniLM fine-tuning",
        "target": ">= 1.0x", "ok": ratio >= 1.0,
    }
