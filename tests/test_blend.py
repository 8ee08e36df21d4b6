"""Pure blending maths: the global window grid, window weights, reflection, normalisation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blend import WindowGrid, blend_region, reflect_index, window_weights
from pipeline.errors import ConfigError


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.sampled_from([16, 64, 256]), st.sampled_from([0.0, 0.25, 0.5]))
def test_every_pixel_is_covered_and_windows_start_on_the_grid(size, window, overlap):
    g = WindowGrid.from_overlap(window, overlap)
    o = g.origins(size)
    assert o[0] == -g.pad
    assert np.all(np.diff(o) == g.stride)
    assert o[-1] + window >= size  # the last pixel is covered
    assert len(o) == 1 or o[-2] + window < size  # no window more than needed
    covered = np.zeros(size, bool)
    for x in o:
        covered[max(0, x) : max(0, x + window)] = True
    assert covered.all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2000), st.integers(0, 1999), st.integers(1, 600))
def test_touching_windows_are_exactly_those_overlapping(size, lo, span):
    lo = min(lo, size - 1)
    hi = min(size, lo + span)
    g = WindowGrid.from_overlap(64, 0.25)
    t = set(g.touching(size, lo, hi).tolist())
    expected = {int(x) for x in g.origins(size) if x < hi and x + 64 > lo}
    assert t == expected


@pytest.mark.parametrize("kind", ["hann", "gaussian"])
@pytest.mark.parametrize("w", [16, 64, 255, 256])
def test_weights_positive_and_exactly_symmetric(kind, w):
    wt = window_weights(w, kind)
    assert wt.shape == (w, w) and wt.dtype == np.float64
    assert (wt > 0).all()
    np.testing.assert_array_equal(wt, wt[::-1, :])
    np.testing.assert_array_equal(wt, wt[:, ::-1])
    np.testing.assert_array_equal(wt, wt.T)
    assert wt.argmax() == (w // 2) * w + w // 2 or w % 2 == 0


def test_reflect_index_matches_numpy_pad():
    for size in (1, 2, 3, 7, 50):
        a = np.arange(size)
        pad = 3 * size + 5
        expected = np.pad(a, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
        got = a[reflect_index(np.arange(-pad, size + pad), size)]
        np.testing.assert_array_equal(got, expected)


def test_bad_window_configs_are_refused():
    with pytest.raises(ConfigError, match="multiple of 8"):
        WindowGrid.from_overlap(100, 0.25, divisor=8)
    with pytest.raises(ConfigError):
        WindowGrid.from_overlap(64, 1.0)


@pytest.mark.parametrize("shape", [(37, 50), (1, 90), (200, 1), (130, 129), (64, 64)])
@pytest.mark.parametrize("kind", ["hann", "gaussian"])
def test_constant_model_gives_constant_output_up_to_the_edges(shape, kind):
    const = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    g = WindowGrid.from_overlap(32, 0.25)
    img = np.random.default_rng(0).normal(size=(2,) + shape)

    def predict(batch):
        return np.broadcast_to(const[None, :, None, None], (len(batch), 3) + batch.shape[2:]).copy()

    out = blend_region(lambda a, b, c, d: img[:, a:b, c:d], shape, (0, shape[0]), (0, shape[1]), g,
                       window_weights(32, kind), predict, 3, 4)  # fmt: skip
    assert out.shape == (3,) + shape
    np.testing.assert_allclose(out, np.broadcast_to(const[:, None, None], out.shape), rtol=0, atol=1e-7)


def _pixelwise(batch):
    """A per-pixel 'model': softmax of fixed linear maps of the bands (flip-equivariant)."""
    w = np.array([[1.0, -0.5], [0.3, 0.8], [-1.0, 0.2]])
    logits = np.einsum("kc,nchw->nkhw", w, batch)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_blending_places_every_window_where_it_belongs():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, 75, 61))
    g = WindowGrid.from_overlap(16, 0.5)
    w = window_weights(16)
    run = lambda im: blend_region(lambda a, b, c, d: im[:, a:b, c:d], im.shape[1:], (0, im.shape[1]),  # noqa: E731
                                  (0, im.shape[2]), g, w, _pixelwise, 3, 5)  # fmt: skip
    out = run(img)
    np.testing.assert_allclose(out, _pixelwise(img[None])[0], atol=1e-6)
    # flipping the input flips the output
    np.testing.assert_allclose(run(img[:, ::-1, :]), out[:, ::-1, :], atol=1e-6)
    np.testing.assert_allclose(run(img[:, :, ::-1]), out[:, :, ::-1], atol=1e-6)


def test_chunks_of_the_region_equal_the_whole():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(2, 90, 70))
    g = WindowGrid.from_overlap(32, 0.25)
    w = window_weights(32, "gaussian")
    conv = lambda b: _pixelwise(b + np.roll(b, 1, axis=2))  # noqa: E731  (uses a neighbour: window-dependent)
    read = lambda a, b, c, d: img[:, a:b, c:d]  # noqa: E731
    whole = blend_region(read, (90, 70), (0, 90), (0, 70), g, w, conv, 3, 4)
    for r0, r1, c0, c1 in [(0, 33, 0, 70), (33, 90, 0, 20), (33, 90, 20, 70), (10, 11, 69, 70)]:
        part = blend_region(read, (90, 70), (r0, r1), (c0, c1), g, w, conv, 3, 4)
        np.testing.assert_array_equal(part, whole[:, r0:r1, c0:c1])
