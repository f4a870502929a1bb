"""``make bench`` section "deep_speed": fine-tuning throughput, each way against the plain one.

Text: MiniLM on comp5329 captions, fully fine-tuned on shuffled batches (the straightforward
baseline), on batches of similar caption length (``train.length_buckets``), and as
``minilm_ft`` trains it (top layers on cached lower-layer states, ``model.params.train_layers``).
Images: EfficientNet-Lite0 on fashion photos, the whole backbone vs the top stages on cached
features (``model.params.train_blocks``). Every side trains the same initial weights for the
same number of optimizer steps through the engine's own dataset, loader, optimizer and loss;
the runs alternate so a neighbour's load on the shared CPU hits every side alike. Images are
fed in the default NCHW layout on both sides (``train.channels_last`` is a separate, further
speed-up).
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


def compare(cfg: Config, comp: Competition, sides: dict[str, list[str]], steps: int) -> dict[str, dict[str, float]]:
    """Samples/s of each side (``cfg`` with that side's overrides), two alternating runs each.

    Every side trains a copy of the same initial weights; a side's one-off cost (a prefix
    cache) is paid before its timer starts, like the first fold of a real run pays it once.
    """
    from mmfold.config import apply_overrides
    from mmfold.models import build_model

    cfgs = {}
    for side, overrides in sides.items():
        cfgs[side] = copy.deepcopy(cfg)
        apply_overrides(cfgs[side], overrides)
    models = {side: build_model(c, comp.classes) for side, c in cfgs.items()}
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(2):
        for side in sides:
            runs[side].append(train_samples_per_s(cfgs[side], comp, steps, model=models[side]))
    return {side: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for side, rs in runs.items()}


def _subset(cfg: Config, n: int) -> Competition | None:
    """The first ``n`` train rows of ``cfg``'s data (no test split), or None if it is absent."""
    from pathlib import Path

    from mmfold.data.competition import load_competition

    if not (Path(cfg.data.root) / cfg.data.train_csv).exists():
        return None
    full = load_competition(cfg.data, use_saved=False)
    return dataclasses.replace(full, train=full.train.iloc[:n].reset_index(drop=True), test=None)


def _ratios(rates: dict[str, dict[str, float]], base: str) -> dict[str, Any]:
    """Per side: samples/s, its ratio to ``base``, padding share and threads."""
    return {side: {"samples_per_s": round(r["samples_per_s"], 1),
                   "ratio": round(r["samples_per_s"] / rates[base]["samples_per_s"], 2),
                   "padding": round(r["padding"], 3), "threads": int(r["threads"])} for side, r in rates.items()}


def text_speed(quick: bool) -> dict[str, Any]:
    """MiniLM on comp5329 captions: the straightforward full fine-tune on shuffled batches vs
    length buckets, vs ``minilm_ft`` as configured (top layers on cached lower-layer states)."""
    from mmfold.config import load_config

    cfg = load_config("comp5329", "minilm_ft", ["train.progress=false"])
    comp = _subset(cfg, 128 if quick else 768)
    if comp is None:
        return {"skipped": f"no {cfg.data.root}/{cfg.data.train_csv}"}
    sides = {"full_shuffled": ["model.params.train_layers=null", "train.length_buckets=0"],
             "full_bucketed": ["model.params.train_layers=null"], "cached_top": []}
    rates = _ratios(compare(cfg, comp, sides, 3 if quick else 12), "full_shuffled")
    return {"data": cfg.data.name, "rows": len(comp.train), "train_layers": cfg.model.params.get("train_layers"),
            "sides": rates, "headline": f"{rates['cached_top']['ratio']:.2f}x samples/s of full fine-tuning on "
            f"shuffled batches ({rates['full_bucketed']['ratio']:.2f}x from length buckets alone)"}


def image_speed(quick: bool) -> dict[str, Any]:
    """EfficientNet-Lite0 on fashion photos at 80x60: the whole backbone fine-tuned vs
    ``effnet_lite0_ft`` as configured (top stages on the cached stem and lower stages)."""
    from mmfold.config import load_config

    cfg = load_config("fashion", "effnet_lite0_ft", ["train.progress=false"])
    comp = _subset(cfg, 256 if quick else 1024)
    if comp is None:
        return {"skipped": f"no {cfg.data.root}/{cfg.data.train_csv}"}
    sides = {"full": ["model.params.train_blocks=null"], "cached_top": []}
    rates = _ratios(compare(cfg, comp, sides, 3 if quick else 12), "full")
    return {"data": cfg.data.name, "rows": len(comp.train), "train_blocks": cfg.model.params.get("train_blocks"),
            "sides": rates, "headline": f"{rates['cached_top']['ratio']:.2f}x images/s of fine-tuning the whole backbone"}


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Fine-tuning throughput on this machine, each way of training against the plain one.

    Text (MiniLM, comp5329 captions): full fine-tuning on shuffled batches (the baseline),
    full on length-bucketed batches, and the top layers on cached states. Images
    (EfficientNet-Lite0, fashion photos): the whole backbone vs the top stages on cached
    features. The first 768 captions / 1,024 photos of ``../shared/data`` (``quick``: 128 /
    256 rows, 3 timed steps instead of 12). Needs ``make weights``.
    """
    from mmfold.models.base import project_path

    if not (project_path("weights/minilm") / "config.json").exists():
        return {"skipped": "no weights/minilm: run `make weights`"}
    text, image = text_speed(quick), image_speed(quick)
    heads = [f"text {text['headline']}" if "headline" in text else "", f"images {image['headline']}" if "headline" in image else ""]
    ok = all(side["ratio"] >= 1.0 for part in (text, image) for name, side in part.get("sides", {}).items()
             if name != "full_shuffled" and name != "full")
    return {"text": text, "image": image, "headline": "; ".join(h for h in heads if h),
            "target": "cached top >= 1.0x the full fine-tune", "ok": ok}
