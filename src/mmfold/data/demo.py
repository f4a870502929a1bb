"""A small synthetic competition that behaves like a real one (``mmfold demo-data``).

Ten labels on 64x64 images of coloured shapes on textured backgrounds, with captions.
Some labels are visible but rarely written (textures), some are written but barely visible
(``night``, ``handmade``), and the rest show in both with paraphrases and omissions. So an
image-only model misses the text-only labels, a text-only model misses the visual ones, and a
fused model can get both: the demo shows why this pipeline fuses modalities.
Deterministic: the same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mmfold import fileio, paths

LABELS = ["circle", "square", "triangle", "red", "blue", "striped", "dotted", "large", "night", "handmade"]
PRIOR = np.array([0.40, 0.30, 0.20, 0.35, 0.25, 0.15, 0.10, 0.20, 0.12, 0.08])
# (probability a present label is written in the caption, words used for it)
MENTION = {
    "circle": (0.5, ["circle", "round shape", "ring", "disc"]),
    "square": (0.5, ["square", "box", "block"]),
    "triangle": (0.5, ["triangle", "pointy shape", "wedge"]),
    "red": (0.4, ["red", "crimson", "scarlet"]),
    "blue": (0.4, ["blue", "navy", "azure"]),
    "striped": (0.1, ["stripes"]),
    "dotted": (0.0, []),
    "large": (0.3, ["big", "large", "huge"]),
    "night": (0.9, ["at night", "after dark", "in the evening", "under the moon"]),
    "handmade": (0.9, ["handmade", "crafted by hand", "a DIY piece", "hand-painted"]),
}
FILLERS = ["A picture of", "An image showing", "Here is", "A photo with", "Look at", "Snapshot of"]
DISTRACTORS = ["on a table", "from the archive", "seen from above", "in the gallery", "with soft light", ""]
SIZE = 64


def sample_labels(rng: np.random.Generator) -> list[str]:
    """1-4 labels with an imbalanced prior (at least one shape, so every image has content)."""
    on = rng.random(len(LABELS)) < PRIOR
    if not on[:3].any():
        on[rng.choice(3, p=[0.5, 0.3, 0.2])] = True
    chosen = [l for l, o in zip(LABELS, on) if o]
    if len(chosen) > 4:
        keep = sorted(rng.choice(len(chosen), 4, replace=False))
        shapes = [c for c in chosen if c in LABELS[:3]]
        chosen = [chosen[i] for i in keep]
        if not any(c in LABELS[:3] for c in chosen):
            chosen[0] = shapes[0]
    return chosen


def draw_image(labels: list[str], rng: np.random.Generator) -> Image.Image:
    """Render the visual evidence of ``labels`` (night only darkens slightly: weak signal)."""
    base = int(rng.integers(150, 230)) - (25 if "night" in labels else 0)
    noise = rng.integers(-12, 12, (SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    _texture(d, labels, rng)
    colours = [c for c in ("red", "blue") if c in labels] or ["other"]
    shapes = [l for l in labels if l in LABELS[:3]]
    for i in range(max(len(shapes), len(colours))):  # every colour label shows on some shape
        _shape(d, shapes[i % len(shapes)], colours[i % len(colours)], "large" in labels and i == 0, rng)
    return img


def _texture(d: ImageDraw.ImageDraw, labels: list[str], rng: np.random.Generator) -> None:
    """Background stripes / dots."""
    grey = int(rng.integers(60, 110))
    if "striped" in labels:
        step = int(rng.integers(5, 9))
        for x in range(0, SIZE, step):
            d.line([(x, 0), (x, SIZE)], fill=(grey, grey, grey), width=2)
    if "dotted" in labels:
        for _ in range(40):
            x, y = rng.integers(0, SIZE, 2)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(grey, grey, grey))


def _shape(d: ImageDraw.ImageDraw, shape: str, colour: str, large: bool, rng: np.random.Generator) -> None:
    """One filled shape at a random place; size reveals ``large``."""
    r = int(rng.integers(20, 28)) if large else int(rng.integers(7, 12))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    fill = _colour(colour, rng)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """Jittered RGB for a colour label ('other' is green or yellow)."""
    j = rng.integers(-25, 25, 3)
    base = {"red": (210, 30, 30), "blue": (30, 50, 210)}.get(name) or [(40, 170, 40), (220, 200, 30)][rng.integers(2)]
    return tuple(int(np.clip(b + x, 0, 255)) for b, x in zip(base, j))


def write_caption(labels: list[str], rng: np.random.Generator) -> str:
    """Mention some labels (paraphrased), miss others, add a rare false mention."""
    words = [rng.choice(MENTION[l][1]) for l in labels if MENTION[l][1] and rng.random() < MENTION[l][0]]
    if rng.random() < 0.05:
        wrong = rng.choice([l for l in LABELS if l not in labels and MENTION[l][1]])
        words.append(rng.choice(MENTION[wrong][1]))
    rng.shuffle(words)
    body = ", ".join(words) if words else "something"
    return f"{rng.choice(FILLERS)} {body} {rng.choice(DISTRACTORS)}".strip() + "."


def make_demo(out: Path, n_train: int = 1500, n_test: int = 500, seed: int = 0) -> None:
    """Write ``train.csv``, ``test.csv`` and ``images/`` under ``out`` (atomically per file)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        labels = sample_labels(rng)
        image_id = f"{i:05d}.jpg"
        img = draw_image(labels, rng)
        fileio.atomic_write(out / "images" / image_id, lambda tmp, im=img: im.save(tmp, format="JPEG", quality=90))
        rows.append({"ImageID": image_id, "Labels": " ".join(labels), "Caption": write_caption(labels, rng)})
    df = pd.DataFrame(rows)
    fileio.write_csv(df.iloc[:n_train], out / "train.csv")
    fileio.write_csv(df.iloc[n_train:][["ImageID", "Caption"]], out / "test.csv")
    # Hidden answers for the demo test set, for measuring a "leaderboard" score locally.
    fileio.write_csv(df.iloc[n_train:][["ImageID", "Labels"]], out / "test_solution.csv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold demo-data`` options."""
    p.add_argument("--out", default="input/demo", help="output folder")
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Write the demo data unless it is already there (same seed, same bytes)."""
    out = paths.resolve(args.out)
    if (out / "train.csv").exists() and not args.force:
        print(f"{out} already has demo data (use --force to rewrite)")
        return 0
    make_demo(out, args.n_train, args.n_test, args.seed)
    print(f"wrote {args.n_train} train / {args.n_test} test items with {len(LABELS)} labels to {out}")
    return 0
