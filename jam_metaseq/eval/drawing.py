"""What the model draws, measured: read a picture's background colour, shape colour and shape off its
pixels, for the built-in generator's palette and shapes (issue 25 item 5).

A miniature of GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment"), which checks generated images against the prompt's objects, colours and
positions with detectors: here the generator knows every picture's palette and shapes, so plain
pixel rules do it.

- **Background**: the pixels of the picture's outer ring (the generator keeps every shape inside
  the frame), each given its nearest background colour (``BACKGROUNDS``, Euclidean RGB); the most
  frequent one.
- **Shape colour**: every pixel given its nearest colour among the backgrounds and the shape
  colours (``COLOURS``); the most frequent shape colour (a picture with no shape-coloured pixel has
  none, and is wrong).
- **Shape**: the shape-coloured pixels' mask, described by three numbers (its share of its bounding
  box: a square fills it, a circle pi/4, a triangle 1/2; the widths of its top and bottom quarters
  over its widest row), classified by nearest centroid (standardised features) trained on the
  generator's own pictures (``ShapeClassifier``). Its accuracy on fresh generator pictures is
  measured when it is trained; below ``RELIABLE`` the shape is not scored.

``score_pictures`` gives the share of pictures whose background, colour, shape, and all of them
(shape included only when the classifier is reliable) match the target.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS, SHAPES, shape_samples

RELIABLE = 0.9
"""The shape classifier's accuracy on fresh generator pictures below which shapes are not scored."""
FEATURES = ("fill", "top_width", "bottom_width")

_PALETTE_NAMES = list(BACKGROUNDS) + list(COLOURS)
_PALETTE = np.asarray([*BACKGROUNDS.values(), *COLOURS.values()], dtype=np.float32)  # (P, 3)
_N_BACKGROUNDS = len(BACKGROUNDS)


@dataclass(frozen=True)
class Reading:
    """What a picture shows, read off its pixels."""

    background: str
    colour: str | None
    """The shape's colour; None when no pixel is nearest a shape colour."""
    shape: str | None
    """None without a classifier or a shape-coloured pixel."""
    features: tuple[float, ...] | None = None


def _rgb(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(N, 3) pixels -> (N,) index of the nearest palette entry."""
    d = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


def shape_features(mask: np.ndarray) -> tuple[float, ...] | None:
    """``FEATURES`` of a (H, W) bool mask, None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    widths = box.sum(axis=1).astype(np.float32)  # (h,)
    q = max(1, box.shape[0] // 4)
    widest = float(widths.max())
    return (float(box.mean()), float(widths[:q].mean()) / widest, float(widths[-q:].mean()) / widest)


def read_picture(image: Any, *, classifier: "ShapeClassifier | None" = None) -> Reading:
    """Background, shape colour and (with a classifier) shape of one picture (PIL or (H, W, 3))."""
    px = _rgb(image)
    h, w, _ = px.shape
    ring = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])  # (2w + 2h - 4, 3)
    bg = np.bincount(_nearest(ring, _PALETTE[:_N_BACKGROUNDS]), minlength=_N_BACKGROUNDS).argmax()
    labels = _nearest(px.reshape(-1, 3), _PALETTE).reshape(h, w)  # (H, W) palette index
    shape_px = labels >= _N_BACKGROUNDS
    colour = None
    if shape_px.any():
        colour = _PALETTE_NAMES[int(np.bincount(labels[shape_px], minlength=len(_PALETTE)).argmax())]
    feats = shape_features(shape_px)
    shape = classifier.predict_features(feats) if classifier is not None and feats is not None else None
    return Reading(background=_PALETTE_NAMES[int(bg)], colour=colour, shape=shape, features=feats)


@dataclass
class ShapeClassifier:
    """Nearest centroid over standardised ``FEATURES``, fitted on generator pictures."""

    centroids: np.ndarray = field(default_factory=lambda: np.zeros((len(SHAPES), len(FEATURES))))
    """(shapes, features), standardised."""
    mean: np.ndarray = field(default_factory=lambda: np.zeros(len(FEATURES)))
    std: np.ndarray = field(default_factory=lambda: np.ones(len(FEATURES)))
    accuracy: float | None = None
    """On fresh generator pictures (``train``)."""

    def fit(self, features: np.ndarray, labels: Sequence[str]) -> "ShapeClassifier":
        x = np.asarray(features, dtype=np.float64)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        y = np.asarray(labels)
        self.centroids = np.stack([z[y == s].mean(0) for s in SHAPES])
        return self

    def predict_features(self, features: Sequence[float]) -> str:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return SHAPES[int(((self.centroids - z) ** 2).sum(-1).argmin())]

    def predict(self, image: Any) -> str | None:
        return read_picture(image, classifier=self).shape

    @property
    def reliable(self) -> bool:
        return self.accuracy is not None and self.accuracy >= RELIABLE


def _features_of(samples) -> tuple[np.ndarray, list[str]]:
    feats, labels = [], []
    for s in samples:
        f = read_picture(s.image).features
        if f is not None:
            feats.append(f)
            labels.append(s.shape)
    return np.asarray(feats), labels


@functools.lru_cache(maxsize=8)
def train_shape_classifier(*, size: int = 32, n: int = 300, test: int = 300, seed: int = 0) -> ShapeClassifier:
    """Fit on ``n`` generator pictures of ``size`` px, measure accuracy on ``test`` fresh ones."""
    clf = ShapeClassifier().fit(*_features_of(shape_samples(n, size=size, seed=seed)))
    fresh = shape_samples(test, size=size, seed=seed + 10_000)
    clf.accuracy = float(np.mean([clf.predict(s.image) == s.shape for s in fresh]))
    return clf


def score_pictures(images: Sequence[Any], targets: Sequence[Any], *, classifier: ShapeClassifier | None = None
                   ) -> dict[str, Any]:
    """Share of ``images`` whose reading matches ``targets`` (anything with ``shape``, ``colour``,
    ``background``; a missing image, None, is wrong on every count)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} pictures for {len(targets)} targets")
    use_shape = classifier is not None and classifier.reliable
    hits = {"background": 0, "colour": 0, "shape": 0, "all": 0}
    for img, t in zip(images, targets):
        if img is None:
            continue
        r = read_picture(img, classifier=classifier)
        ok = {"background": r.background == t.background, "colour": r.colour == t.colour, "shape": r.shape == t.shape}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += ok["background"] and ok["colour"] and (ok["shape"] or not use_shape)
    n = len(images)
    out: dict[str, Any] = {k: (v / n if n else float("nan")) for k, v in hits.items()}
    out["n"] = n
    if not use_shape:
        out["shape"] = None
    out["shape_classifier_accuracy"] = None if classifier is None else classifier.accuracy
    return out
