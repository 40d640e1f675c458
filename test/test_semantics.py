"""lsm_ros.semantics: phrase validation, QueryResult arithmetic against direct loops, palette, overlay, slugs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lsm_ros import semantics
from lsm_ros.semantics import (DEFAULT_LABELS, MAX_PHRASE_CHARS, MAX_PHRASES, NO_LABEL, QueryResult, label_palette,
                               overlay, parse_views, slug, unique_slugs, validate_phrases)

LOGIT_SCALE = 1.0 / 0.07


def _result(views=(0, 1), phrases=('wall', 'chair', 'table'), height=5, width=7, points=11, seed=0) -> QueryResult:
    rng = np.random.default_rng(seed)
    cosine = rng.uniform(-1, 1, size=(len(views), len(phrases), height, width))
    point_cosine = rng.uniform(-1, 1, size=(points, len(phrases)))
    return QueryResult(phrases=phrases, views=views, logits=LOGIT_SCALE * cosine,
                       point_logits=LOGIT_SCALE * point_cosine, logit_scale=LOGIT_SCALE)


# ------------------------------------------------------------------------------------------------ validation
def test_valid_phrases_are_stripped_and_kept_in_order() -> None:
    assert validate_phrases(['  chair', 'Dining table ', 'chairs']) == ('chair', 'Dining table', 'chairs')
    assert validate_phrases(('a',)) == ('a',)
    assert validate_phrases(['x' * MAX_PHRASE_CHARS]) == ('x' * MAX_PHRASE_CHARS,)
    assert validate_phrases([f'thing {i}' for i in range(MAX_PHRASES)])[-1] == f'thing {MAX_PHRASES - 1}'
    assert validate_phrases(list(DEFAULT_LABELS)) == DEFAULT_LABELS
    assert len(DEFAULT_LABELS) == 8


@pytest.mark.parametrize('phrases,message', [
    ('chair', 'list of strings'),
    (None, 'list of strings'),
    ({'chair'}, 'list of strings'),
    ([], 'no phrases'),
    (['chair', 3], 'phrase 1 is a int'),
    (['chair', b'table'], 'phrase 1 is a bytes'),
    ([''], 'phrase 0 is empty'),
    (['chair', ' \t\n'], 'phrase 1 is empty'),
    (['x' * (MAX_PHRASE_CHARS + 1)], f'at most {MAX_PHRASE_CHARS}'),
    ([f'thing {i}' for i in range(MAX_PHRASES + 1)], f'at most {MAX_PHRASES}'),
    (['chair', 'table', ' Chair '], "phrase 2 \\('Chair'\\) repeats phrase 0"),
])
def test_invalid_phrases_are_refused_with_the_reason(phrases, message) -> None:
    with pytest.raises(ValueError, match=message):
        validate_phrases(phrases)


@pytest.mark.parametrize('text,views', [('', (0, 1)), ('both', (0, 1)), ('left', (0,)), (' Right ', (1,))])
def test_view_names(text, views) -> None:
    assert parse_views(text) == views


@pytest.mark.parametrize('text', ['top', 'left,right', '0'])
def test_unknown_view_names_are_refused(text) -> None:
    with pytest.raises(ValueError, match="'left', 'right', 'both'"):
        parse_views(text)


# ------------------------------------------------------------------------------------------------ QueryResult
def test_query_result_checks_its_shapes() -> None:
    logits = np.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match='logits must be'):
        QueryResult(('a', 'b'), (0, 1), logits, None, LOGIT_SCALE)
    with pytest.raises(ValueError, match='views must be'):
        QueryResult(('a', 'b', 'c'), (0, 0), logits, None, LOGIT_SCALE)
    with pytest.raises(ValueError, match='views must be'):
        QueryResult(('a', 'b', 'c'), (1, 2), logits, None, LOGIT_SCALE)
    with pytest.raises(ValueError, match='point_logits must be'):
        QueryResult(('a', 'b', 'c'), (0, 1), logits, np.zeros((7, 2)), LOGIT_SCALE)
    with pytest.raises(ValueError, match='logit_scale'):
        QueryResult(('a', 'b', 'c'), (0, 1), logits, None, 0.0)
    result = QueryResult(['a', 'b', 'c'], [0, 1], logits.astype(np.float64), None, LOGIT_SCALE)
    assert result.logits.dtype == np.float32 and result.phrases == ('a', 'b', 'c') and result.views == (0, 1)
    assert result.image_size == (5, 4) and result.point_labels is None


def test_similarity_probabilities_and_labels_equal_direct_loops() -> None:
    result = _result()
    V, P, H, W = result.logits.shape
    for v in range(V):
        for r in range(H):
            for c in range(W):
                scores = [float(result.logits[v, p, r, c]) for p in range(P)]
                exps = [math.exp(s - max(scores)) for s in scores]
                for p in range(P):
                    assert result.similarity[v, p, r, c] == pytest.approx(scores[p] / LOGIT_SCALE, rel=1e-6)
                    assert result.probabilities[v, p, r, c] == pytest.approx(exps[p] / sum(exps), rel=1e-5)
                assert result.labels[v, r, c] == scores.index(max(scores))
    assert result.labels.shape == (V, H, W) and result.probabilities.dtype == np.float32
    for n in range(result.point_logits.shape[0]):
        row = list(result.point_logits[n])
        assert result.point_labels[n] == row.index(max(row))


def test_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([[[[1000.0]], [[999.0]]]])            # (1 view, 2 phrases, 1x1)
    probabilities = QueryResult(('a', 'b'), (0,), logits, None, 100.0).probabilities
    assert np.isfinite(probabilities).all()
    assert probabilities[0, :, 0, 0] == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], rel=1e-6)


@pytest.mark.parametrize('threshold', [0.0, 0.4, 0.6, 1.0])
def test_masks_label_images_and_scores_equal_direct_loops(threshold) -> None:
    result = _result(seed=3)
    V, P, H, W = result.logits.shape
    masks, label_images, scores = result.masks(threshold), result.label_images(threshold), result.scores(threshold)
    assert masks.shape == (V, P, H, W) and masks.dtype == bool
    assert label_images.shape == (V, H, W) and label_images.dtype == np.uint8
    counts = np.zeros(P)
    for v in range(V):
        for r in range(H):
            for c in range(W):
                probabilities = [float(result.probabilities[v, p, r, c]) for p in range(P)]
                best = int(np.argmax([result.logits[v, p, r, c] for p in range(P)]))
                confident = probabilities[best] >= threshold
                assert label_images[v, r, c] == (best if confident else NO_LABEL)
                for p in range(P):
                    assert masks[v, p, r, c] == (p == best and confident)
                    counts[p] += masks[v, p, r, c]
    np.testing.assert_allclose(scores, counts / (V * H * W), rtol=1e-6)
    if threshold == 0.0:                                     # every pixel is in exactly one mask
        assert masks.sum(axis=1).min() == 1 and scores.sum() == pytest.approx(1.0)


def test_per_phrase_maxima_equal_direct_loops() -> None:
    result = _result(seed=5)
    P = len(result.phrases)
    for p in range(P):
        assert result.max_probabilities()[p] == pytest.approx(float(result.probabilities[:, p].max()))
        assert result.max_similarities()[p] == pytest.approx(float(result.logits[:, p].max()) / LOGIT_SCALE, rel=1e-6)
    assert (result.max_similarities() <= 1.0).all() and (result.max_probabilities() <= 1.0).all()


@pytest.mark.parametrize('threshold', [-0.1, 1.5, float('nan')])
def test_thresholds_outside_zero_one_are_refused(threshold) -> None:
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        _result().masks(threshold)


def test_selecting_views_keeps_their_arrays() -> None:
    result = _result()
    right = result.select_views([1])
    assert right.views == (1,) and right.phrases == result.phrases
    np.testing.assert_array_equal(right.logits[0], result.logits[1])
    np.testing.assert_array_equal(right.masks(0.3)[0], result.masks(0.3)[1])
    assert right.point_logits is result.point_logits
    assert result.select_views((0, 1)) is result
    assert right.view_position(1) == 0
    with pytest.raises(ValueError, match='view 0 was not queried'):
        right.select_views([0])


# ------------------------------------------------------------------------------------------------ display
def test_palette_is_deterministic_distinct_and_prefix_stable() -> None:
    palette = label_palette(MAX_PHRASES)
    assert palette.shape == (MAX_PHRASES, 3) and palette.dtype == np.uint8
    assert len({tuple(colour) for colour in palette}) == MAX_PHRASES
    np.testing.assert_array_equal(label_palette(8), palette[:8])
    np.testing.assert_array_equal(label_palette(MAX_PHRASES), palette)
    first = palette[:len(DEFAULT_LABELS)].astype(float)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)[np.triu_indices(len(first), 1)]
    assert distances.min() > 60                                # the default eight are easy to tell apart
    assert label_palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        label_palette(-1)


def test_overlay_blends_label_colours_and_keeps_unlabelled_pixels() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=(4, 6))
    labels[0, 0] = NO_LABEL
    palette = label_palette(3)
    blended = overlay(image, labels, 0.25, palette)
    for r in range(4):
        for c in range(6):
            if labels[r, c] == NO_LABEL:
                expected = image[r, c]
            else:
                expected = np.round(0.75 * image[r, c].astype(float) + 0.25 * palette[labels[r, c]].astype(float))
            np.testing.assert_array_equal(blended[r, c], expected)
    np.testing.assert_array_equal(overlay(image, labels, 0.0), image)
    full = overlay(image, labels, 1.0)
    np.testing.assert_array_equal(full[1:, :], semantics.colorize_labels(labels, label_palette(3))[1:, :])
    with pytest.raises(ValueError, match='alpha'):
        overlay(image, labels, 1.5)
    with pytest.raises(ValueError, match='image size'):
        overlay(image, labels[:, :5], 0.5)
    with pytest.raises(ValueError, match='uint8'):
        overlay(image.astype(np.float32), labels, 0.5)


def test_colorized_labels_are_black_outside_the_palette() -> None:
    labels = np.array([[0, 1], [NO_LABEL, 2]])
    colours = semantics.colorize_labels(labels, label_palette(2))
    np.testing.assert_array_equal(colours[0, 1], label_palette(2)[1])
    assert (colours[1] == 0).all()


@pytest.mark.parametrize('phrase,expected', [
    ('chair', 'chair'), ('Dining Table', 'dining_table'), ('  a/b\\c:d*e?  ', 'a_b_c_d_e'), ('../../etc', 'etc'),
    ('日本', 'phrase'), ('', 'phrase'), ('x' * 300, 'x' * semantics.SLUG_MAX_CHARS)])
def test_slug_is_file_name_safe(phrase, expected) -> None:
    assert slug(phrase) == expected


def test_unique_slugs_disambiguate_in_order() -> None:
    assert unique_slugs(['chair!', 'chair?', 'chair 2', 'table']) == ('chair', 'chair_2', 'chair_2_2', 'table')
