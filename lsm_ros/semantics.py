"""Text queries on a semantic reconstruction: phrase validation, the query result and its derived products.

Framework-free (numpy only). A query compares every pixel's (and every Gaussian's) semantic feature with the
CLIP text feature of each phrase, as LSM labels its views: ``logits = logit_scale * cosine(feature, text)``.
Everything else here is derived from those logits:

- ``probabilities``: softmax over the phrases (the phrases compete; they sum to 1 per pixel);
- ``labels``: the arg-max phrase per pixel (ties: the first phrase);
- ``masks(threshold)``: pixel p belongs to phrase k when its label is k and its probability is >= threshold
  (threshold 0: plain arg-max; every pixel is in exactly one mask);
- ``scores(threshold)``: per phrase, the fraction of the pixels of the requested views that are in its mask.

Views are numbered as in the pipeline: 0 = view 1 (left), 1 = view 2 (right). Label images use
:data:`NO_LABEL` (255) for pixels below the threshold; at most :data:`MAX_PHRASES` phrases keep every label in
a uint8.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# The eight classes of LSM's label set (its evaluation and demo vocabulary).
DEFAULT_LABELS: tuple[str, ...] = ('wall', 'floor', 'ceiling', 'chair', 'table', 'sofa', 'bed', 'other')
MAX_PHRASES = 64
MAX_PHRASE_CHARS = 200
NO_LABEL = 255                      # label-image value of a pixel whose best probability is below the threshold
VIEW_NAMES: tuple[str, ...] = ('left', 'right')   # index = view number (0 = view 1 = left camera)
SLUG_MAX_CHARS = 64


def validate_phrases(phrases: Any) -> tuple[str, ...]:
    """The phrases, stripped of surrounding whitespace; ValueError saying why when they cannot be a query.

    Refused: anything but a list/tuple of str (a bare string too), an empty list, an empty or blank phrase,
    a phrase longer than MAX_PHRASE_CHARS characters, more than MAX_PHRASES phrases, and phrases equal after
    stripping and lower-casing (their masks would compete for the same pixels). CLIP's 77-token limit is
    checked by the tokenizer.
    """
    if isinstance(phrases, (str, bytes)) or not isinstance(phrases, (list, tuple)):
        raise ValueError(f'phrases must be a list of strings, got {type(phrases).__name__} {phrases!r:.80}')
    if not phrases:
        raise ValueError('no phrases given: pass at least one phrase')
    if len(phrases) > MAX_PHRASES:
        raise ValueError(f'{len(phrases)} phrases given; at most {MAX_PHRASES} per query')
    stripped = []
    for position, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise ValueError(f'phrase {position} is a {type(phrase).__name__} ({phrase!r:.80}), not a string')
        text = phrase.strip()
        if not text:
            raise ValueError(f'phrase {position} is empty or blank')
        if len(text) > MAX_PHRASE_CHARS:
            raise ValueError(f'phrase {position} has {len(text)} characters; at most {MAX_PHRASE_CHARS} '
                             f'({text[:40]!r}...)')
        stripped.append(text)
    seen: dict[str, int] = {}
    for position, text in enumerate(stripped):
        key = text.lower()
        if key in seen:
            raise ValueError(f'phrase {position} ({text!r}) repeats phrase {seen[key]} '
                             f'({stripped[seen[key]]!r}); phrases must differ (ignoring case and outer spaces)')
        seen[key] = position
    return tuple(stripped)


def parse_views(text: str) -> tuple[int, ...]:
    """View selection by name: 'left' → (0,), 'right' → (1,), 'both' or '' → (0, 1) (case and spaces ignored)."""
    name = text.strip().lower()
    if name in ('', 'both'):
        return (0, 1)
    if name in VIEW_NAMES:
        return (VIEW_NAMES.index(name),)
    raise ValueError(f"views must be 'left', 'right', 'both' or empty (both), got {text!r}")


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=axis, keepdims=True)


@dataclass(frozen=True, eq=False)
class QueryResult:
    """The answer of a reconstruction to text phrases: LSM's label logits per pixel and per Gaussian.

    ``logits`` (V, P, H, W) float32 for the ``views`` asked (at the model resolution, row-major pixels of each
    view) and ``point_logits`` (N, P) float32, one row per Gaussian in the pipeline's GaussianCloud row order
    (view 1's pixels, then view 2's), or None. ``logit_scale``: the factor LSM applies to cosine similarities.
    Derived arrays are computed on first use and cached (the object is immutable; equality is identity).
    """

    phrases: tuple[str, ...]
    views: tuple[int, ...]
    logits: np.ndarray
    point_logits: np.ndarray | None
    logit_scale: float

    def __post_init__(self) -> None:
        phrases, views = tuple(self.phrases), tuple(int(v) for v in self.views)
        logits = np.asarray(self.logits, dtype=np.float32)
        if logits.ndim != 4 or logits.shape[:2] != (len(views), len(phrases)):
            raise ValueError(f'logits must be (V={len(views)}, P={len(phrases)}, H, W), got {logits.shape}')
        if not views or len(set(views)) != len(views) or not set(views) <= set(range(len(VIEW_NAMES))):
            raise ValueError(f'views must be distinct view numbers among 0 (left) and 1 (right), got {views}')
        point_logits = self.point_logits
        if point_logits is not None:
            point_logits = np.asarray(point_logits, dtype=np.float32)
            if point_logits.ndim != 2 or point_logits.shape[1] != len(phrases):
                raise ValueError(f'point_logits must be (N, P={len(phrases)}), got {point_logits.shape}')
        if not (np.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f'logit_scale must be a positive number, got {self.logit_scale!r}')
        for name, value in (('phrases', phrases), ('views', views), ('logits', logits),
                            ('point_logits', point_logits), ('logit_scale', float(self.logit_scale))):
            object.__setattr__(self, name, value)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the label images."""
        return self.logits.shape[3], self.logits.shape[2]

    @functools.cached_property
    def similarity(self) -> np.ndarray:
        """(V, P, H, W) cosine similarity of each pixel's feature with each phrase, in [-1, 1]."""
        return self.logits / np.float32(self.logit_scale)

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        """(V, P, H, W) softmax of the logits over the phrases."""
        return _softmax(self.logits, axis=1)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """(V, H, W) int64 index of the best phrase of each pixel."""
        return self.logits.argmax(axis=1)

    @functools.cached_property
    def point_labels(self) -> np.ndarray | None:
        """(N,) int64 index of the best phrase of each Gaussian (None without point logits)."""
        return None if self.point_logits is None else self.point_logits.argmax(axis=1)

    @functools.cached_property
    def _best_probability(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @staticmethod
    def _check_threshold(threshold: float) -> float:
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f'threshold must be a probability in [0, 1], got {threshold!r}')
        return threshold

    def label_images(self, threshold: float = 0.0) -> np.ndarray:
        """(V, H, W) uint8 labels; NO_LABEL (255) where the best probability is below ``threshold``."""
        threshold = self._check_threshold(threshold)
        out = self.labels.astype(np.uint8)
        out[self._best_probability < threshold] = NO_LABEL
        return out

    def masks(self, threshold: float = 0.0) -> np.ndarray:
        """(V, P, H, W) bool: pixel in phrase p's mask when its label is p and its probability is >= threshold."""
        threshold = self._check_threshold(threshold)
        phrase_index = np.arange(len(self.phrases)).reshape(1, -1, 1, 1)
        confident = (self._best_probability >= threshold)[:, None]
        return (self.labels[:, None] == phrase_index) & confident

    def scores(self, threshold: float = 0.0) -> np.ndarray:
        """(P,) float32: fraction of all pixels of the queried views that are in each phrase's mask, in [0, 1].

        With threshold 0 the scores sum to 1 (every pixel has a label); a higher threshold leaves uncertain
        pixels out of every mask.
        """
        masks = self.masks(threshold)
        return (masks.sum(axis=(0, 2, 3)) / (masks.shape[0] * masks.shape[2] * masks.shape[3])).astype(np.float32)

    def max_probabilities(self) -> np.ndarray:
        """(P,) float32: each phrase's largest probability over the pixels of the queried views."""
        return self.probabilities.max(axis=(0, 2, 3))

    def max_similarities(self) -> np.ndarray:
        """(P,) float32: each phrase's largest cosine similarity over the pixels of the queried views."""
        return self.similarity.max(axis=(0, 2, 3))

    def view_position(self, view: int) -> int:
        """Position of view number ``view`` (0 left, 1 right) along the first axis of the per-view arrays."""
        if view not in self.views:
            raise ValueError(f'view {view} was not queried; queried: {self.views} (0 left, 1 right)')
        return self.views.index(view)

    def select_views(self, views: Sequence[int]) -> 'QueryResult':
        """The same answer restricted to ``views`` (each one queried here), sharing the point logits."""
        if tuple(int(v) for v in views) == self.views:
            return self
        positions = [self.view_position(int(v)) for v in views]
        return QueryResult(phrases=self.phrases, views=tuple(int(v) for v in views), logits=self.logits[positions],
                           point_logits=self.point_logits, logit_scale=self.logit_scale)


# --------------------------------------------------------------------------------------------- display
def label_palette(count: int) -> np.ndarray:
    """(count, 3) uint8 RGB colours, distinct and deterministic (colour i never depends on ``count``).

    Hues step by the golden angle, so neighbouring labels differ strongly; saturation and value cycle through
    three levels so that the colours stay distinct beyond the hue resolution.
    """
    if count < 0:
        raise ValueError(f'count must be >= 0, got {count}')
    index = np.arange(count, dtype=np.float64)
    hue = (index * 0.618033988749895) % 1.0
    saturation = np.array([0.85, 0.6, 1.0])[np.arange(count) % 3]
    value = np.array([0.95, 0.8, 0.65])[(np.arange(count) // 3) % 3]
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p, q, t = value * (1 - saturation), value * (1 - fraction * saturation), value * (1 - (1 - fraction) * saturation)
    channels = {0: (value, t, p), 1: (q, value, p), 2: (p, value, t), 3: (p, q, value), 4: (t, p, value),
                5: (value, p, q)}
    rgb = np.zeros((count, 3))
    for s, (r, g, b) in channels.items():
        pick = sector == s
        rgb[pick] = np.stack([r, g, b], axis=-1)[pick]
    return np.round(rgb * 255.0).astype(np.uint8)


def colorize_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) label indices -> (H, W, 3) uint8 palette colours; black where the label is outside the palette
    (e.g. NO_LABEL)."""
    labels = np.asarray(labels)
    palette = np.asarray(palette, dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(palette))
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, palette: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` blended with the colours of ``labels`` (H, W): ``(1-alpha)*image + alpha*colour``.

    ``palette`` defaults to :func:`label_palette` for the labels present; pixels whose label is outside the
    palette (e.g. NO_LABEL) keep the image.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be (H, W, 3) uint8, got {image.shape} {image.dtype}')
    if labels.shape != image.shape[:2]:
        raise ValueError(f'labels {labels.shape} must have the image size {image.shape[:2]}')
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
    if palette is None:
        in_range = labels[(labels >= 0) & (labels < NO_LABEL)]
        palette = label_palette(int(in_range.max()) + 1 if in_range.size else 0)
    palette = np.asarray(palette, dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(palette))
    out = image.copy()
    blended = (1.0 - alpha) * image[valid].astype(np.float32) + alpha * palette[labels[valid]].astype(np.float32)
    out[valid] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def slug(phrase: str) -> str:
    """A file-name-safe form of ``phrase``: lower-case ASCII letters, digits and '_' (at most SLUG_MAX_CHARS);
    'phrase' when nothing is left (e.g. a phrase in another script)."""
    text = re.sub(r'[^a-z0-9]+', '_', phrase.strip().lower()).strip('_')[:SLUG_MAX_CHARS].rstrip('_')
    return text or 'phrase'


def unique_slugs(phrases: Sequence[str]) -> tuple[str, ...]:
    """:func:`slug` of each phrase, made unique by suffixes '_2', '_3', ... in order ('chair?' after 'chair!')."""
    used: set[str] = set()
    out = []
    for phrase in phrases:
        base = candidate = slug(phrase)
        number = 2
        while candidate in used:
            candidate = f'{base}_{number}'
            number += 1
        used.add(candidate)
        out.append(candidate)
    return tuple(out)
