"""Instance segmentation across chunks: objects stay whole on chunk corners, touching
objects stay apart on chunk faces, ids stay unique past 65,535, and the tiled result
equals the single-piece result (oracle test) on a crowded synthetic nuclei image."""

import dataclasses

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipeline.errors import ConfigError, InputError
from pipeline.instances import (
    chunking_agreement,
    global_otsu_threshold,
    instance_labels,
    instance_signal,
    merge_plan,
    ordered_counts_pairs,
    relabel,
    segment_chunks,
    with_global_otsu,
)
from pipeline.object_metrics import instance_counts, instance_metrics
from pipeline.segment.instances import ClassicalInstances, fill_small_holes
from tests.synth import crowded_nuclei


def _dask(image: np.ndarray, valid: np.ndarray, chunk: int) -> tuple[da.Array, da.Array]:
    return da.from_array(image, chunks=(-1, chunk, chunk)), da.from_array(valid, chunks=(chunk, chunk))


def _components(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Connected components (4-connected) of band 0 > 0.5: local for objects smaller than the halo."""
    return ndimage.label((block[0] > 0.5) & valid)[0].astype(np.int64)


def _identity(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A 'perfect' kernel: band 0 holds the true ids."""
    return np.rint(block[0]).astype(np.int64)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two label images are equal up to a one-to-one renaming of ids (0 fixed)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (
        len(np.unique(pairs[0])) == pairs.shape[1]
        and len(np.unique(pairs[1])) == pairs.shape[1]
        and np.array_equal((a == 0), (b == 0))
    )


def _disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# -- objects across chunk borders -----------------------------------------------------
@pytest.mark.parametrize("kind", ["components", "classical"])
def test_disk_centred_on_chunk_corner_gets_one_id(kind):
    disk = _disk((128, 128), 63.5, 63.5, 14)  # centre on the corner shared by 4 chunks of 64
    image = disk[None].astype(np.float32)
    valid = np.ones(disk.shape, bool)
    if kind == "components":
        kernel, halo = _components, 30
    else:
        kernel = ClassicalInstances(threshold=0.5, sigma=0, max_diameter=30, min_distance=5)
        halo = kernel.required_halo
    lab = instance_labels(*_dask(image, valid, 64), kernel, halo).compute()
    assert {int(v) for v in np.unique(lab)} == {0, 1}
    np.testing.assert_array_equal(lab == 1, disk)  # the whole disk, nothing else
    assert lab.dtype == np.uint16
    for quadrant in (lab[:64, :64], lab[:64, 64:], lab[64:, :64], lab[64:, 64:]):
        assert (quadrant == 1).sum() > 100  # really split over the four chunks


def _touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two disks of radius 10 on row 64 meeting on the chunk face between columns 63 and 64."""
    gt = np.zeros((128, 128), np.int64)
    gt[_disk(gt.shape, 64, 53.5, 10)] = 1
    gt[_disk(gt.shape, 64, 73.5, 10)] = 2
    return gt


def test_touching_disks_on_chunk_face_stay_two_ids():
    gt = _touching_pair()
    # they do touch across the face: 4-neighbours on columns 63 | 64
    assert ((gt[:, 63] == 1) & (gt[:, 64] == 2)).sum() >= 5
    valid = np.ones(gt.shape, bool)

    # a kernel that knows the true ids: stitching must not merge pieces that only touch
    lab = instance_labels(*_dask(gt[None].astype(np.float32), valid, 64), _identity, 24).compute()
    assert len(np.unique(lab[lab > 0])) == 2
    assert _same_partition(lab, gt)

    # the classical kernel separates them by the distance watershed, chunked as whole
    kernel = ClassicalInstances(threshold=0.5, sigma=0, max_diameter=22, min_distance=5)
    image = (gt > 0)[None].astype(np.float32)
    lab = instance_labels(*_dask(image, valid, 64), kernel, kernel.required_halo).compute()
    ref = kernel(image, valid)
    assert len(np.unique(lab[lab > 0])) == 2
    assert _same_partition(lab, ref)
    for i in (1, 2):
        ids, n = np.unique(lab[gt == i], return_counts=True)
        assert n.max() / n.sum() > 0.95 and ids[np.argmax(n)] != 0  # each disk is (almost all) one id


def test_more_than_65535_objects_in_one_chunk_keep_unique_ids():
    mask = np.zeros((520, 520), bool)
    mask[::2, ::2] = True  # 260 x 260 = 67,600 isolated pixels
    image, valid = mask[None].astype(np.float32), np.ones(mask.shape, bool)
    for chunk in (520, 260):  # one chunk holding all of them; then four chunks
        lab = instance_labels(*_dask(image, valid, chunk), _components, 2).compute()
        assert lab.dtype == np.uint32
        ids = lab[mask]
        assert len(np.unique(ids)) == 67_600 == ids.size  # one id per object, none shared
        assert ids.min() == 1 and ids.max() == 67_600  # consecutive
        assert not lab[~mask].any()


def test_components_equal_whole_array_labels_for_every_chunking():
    """Oracle: a local kernel (connected components of objects smaller than the halo)
    tiled with halo >= the object size gives exactly the whole-array labels, up to
    renaming; nodata pixels are background; ids are 1..N."""
    _, gt = crowded_nuclei(150, 170, 60, seed=3)
    mask = (gt > 0) & (gt % 2 == 0)
    valid = np.ones(mask.shape, bool)
    valid[70:75, :] = False  # a nodata stripe cuts some objects in two
    ref = ndimage.label(mask & valid)[0]
    image = mask[None].astype(np.float32)
    for chunk, halo in ((16, 20), (37, 20), (64, 20), (170, 0)):
        lab = instance_labels(*_dask(image, valid, chunk), _components, halo).compute()
        assert _same_partition(lab, ref), f"chunk {chunk}"
        assert set(np.unique(lab)) == set(range(ref.max() + 1))


def test_tiled_classical_equals_single_piece_on_crowded_nuclei():
    image, gt = crowded_nuclei(200, 180, 110, seed=7, noise=0.06)
    valid = np.ones(gt.shape, bool)
    valid[:4, :] = False  # a nodata edge
    base = ClassicalInstances(sigma=1.0, max_diameter=18, min_distance=4, min_size=10)
    kernel = with_global_otsu(*_dask(image, valid, 64), base)
    results = chunking_agreement(image, valid, kernel, kernel.required_halo, [48, 64, 100, 200])
    for r in results:
        assert r.ari >= 0.999, r
        assert r.n_objects == r.n_reference, r
        assert r.matched == r.n_reference and r.mean_matched_iou >= 0.999, r
    # the method does find the nuclei (not only agree with itself)
    found = instance_metrics(instance_counts(gt, kernel(image, valid), valid))
    assert found.f1[0] >= 0.9, found.at(0.5)

    # control: the same comparison notices a halo that is far too small
    def no_halo_declared(block, ok):
        return kernel(block, ok)

    small = chunking_agreement(image, valid, no_halo_declared, 2, [48])[0]
    assert small.n_objects != small.n_reference or small.matched < small.n_reference or small.mean_matched_iou < 0.999


@pytest.mark.parametrize(
    "options",
    [
        {"split": "intensity"},
        {"edges": True, "edge_sigma": 1.0, "edge_low": 0.05, "edge_high": 0.1},
        {"footprint": "disk", "compactness": 0.01},
        {"polarity": "dark", "fill_holes": False},
    ],
    ids=["intensity", "canny", "disk-compact", "dark"],
)
def test_kernel_options_keep_chunked_equal_to_single_piece(options):
    image, _ = crowded_nuclei(150, 140, 60, seed=9, noise=0.06)
    if options.get("polarity") == "dark":
        image = 1 - image  # dark nuclei on a bright background
    valid = np.ones(image.shape[1:], bool)
    kernel = ClassicalInstances(threshold=0.4 if "polarity" not in options else 0.6, sigma=1.0, max_diameter=18,
                                min_distance=4, min_size=10, **options)  # fmt: skip
    (r,) = chunking_agreement(image, valid, kernel, kernel.required_halo, [48])
    assert r.n_objects == r.n_reference >= 40, r
    # watershed ties between equally high pixels are broken by flooding order, which a
    # crop can change: a few boundary pixels between touching objects may differ
    assert r.matched == r.n_reference and r.mean_matched_iou >= 0.995 and r.ari >= 0.999, r


def test_hole_filling_fills_holes_inside_objects_only():
    fg = np.zeros((60, 60), bool)
    fg[5:15, 5:15] = True
    fg[9:11, 9:11] = False  # a 2 x 2 hole in a 10 px object: filled
    fg[20:55, 20:55] = True
    fg[24:51, 24:51] = False  # a 27 px hole inside a ring wider than max_extent: kept
    fg[0:3, 40:50] = True
    fg[0:2, 44:46] = False  # a notch open to the edge of the array: kept
    out = fill_small_holes(fg, max_extent=12)
    assert out[9:11, 9:11].all()
    assert not out[24:51, 24:51].any()
    assert not out[0:2, 44:46].any()
    np.testing.assert_array_equal(out & ~fg, np.pad(np.ones((2, 2), bool), ((9, 49), (9, 49))))


def test_signal_and_global_otsu_do_not_depend_on_chunking():
    image, _ = crowded_nuclei(120, 130, 40, seed=2)
    valid = np.ones(image.shape[1:], bool)
    valid[:, :3] = False
    kernel = ClassicalInstances(sigma=1.5, max_diameter=18)
    whole = kernel.signal(image, valid)
    ok = valid & np.isfinite(whole)
    edges = np.linspace(whole[ok].min(), whole[ok].max(), 257)
    counts, _ = np.histogram(whole[ok], bins=edges)
    expected = threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2))
    for chunk in (32, 50, 130):
        s = instance_signal(*_dask(image, valid, chunk), kernel)
        np.testing.assert_array_equal(s.compute(), whole)  # bit for bit
        t = global_otsu_threshold(s, da.from_array(valid, chunks=chunk), bins=256)
        assert t == pytest.approx(expected, rel=1e-12)


def test_single_kernel_run_path_relabels_stored_local_labels():
    """segment_chunks -> compute local labels (as a stage would store them) with counts and
    pairs in one pass -> relabel the stored array: same result as instance_labels."""
    image, _ = crowded_nuclei(100, 100, 35, seed=5)
    valid = np.ones(image.shape[1:], bool)
    kernel = ClassicalInstances(threshold=0.35, sigma=1.0, max_diameter=18, min_distance=4)
    img, ok = _dask(image, valid, 40)
    ch = segment_chunks(img, ok, kernel, kernel.required_halo)
    local, counts, pairs = da.compute(ch.local, ch.counts, ch.pairs)
    stored = da.from_array(local, chunks=ch.local.chunks)
    lab = relabel(stored, merge_plan(counts, pairs, ch.local.chunks)).compute()
    np.testing.assert_array_equal(lab, instance_labels(img, ok, kernel, kernel.required_halo).compute())
    with pytest.raises(InputError, match="chunked differently"):
        relabel(stored.rechunk(50), merge_plan(counts, pairs, ch.local.chunks))


def test_chunk_tasks_that_write_their_ranks_give_the_same_counts_pairs_and_ranks():
    """segment_chunks(writer=...) with ordered_counts_pairs (the stage's path: each task writes
    its chunk's ranks, counts and pairs gathered through the row chain, in strips): the
    written ranks, counts and pairs equal those of the plain lazy path, on the same chunks."""
    image, _ = crowded_nuclei(100, 130, 45, seed=5)
    valid = np.ones(image.shape[1:], bool)
    kernel = ClassicalInstances(threshold=0.35, sigma=1.0, max_diameter=18, min_distance=4)
    img, ok = _dask(image, valid, 30)
    ch = segment_chunks(img, ok, kernel, kernel.required_halo)
    local, counts, pairs = da.compute(ch.local, ch.counts, ch.pairs, scheduler="threads")
    assert counts.shape == (4, 5) and len(pairs) > 0  # objects cross chunk borders

    written = np.full(local.shape, -1, np.int64)

    def writer(index, window, block):
        (r0, r1), (c0, c1) = window
        assert index == (r0 // 30, c0 // 30)
        written[r0:r1, c0:c1] = block

    for strips in (None, [(0, 2), (2, 4), (4, 5)]):  # strips of chunk columns: pairs cross them
        written[:] = -1
        ordered = ordered_counts_pairs(segment_chunks(img, ok, kernel, kernel.required_halo, writer=writer), strips)
        got_counts, got_pairs = ordered.compute(scheduler="threads")
        np.testing.assert_array_equal(written, local)
        np.testing.assert_array_equal(got_counts, counts)
        key = lambda p: sorted(map(tuple, p.tolist()))  # noqa: E731 - the order of pair rows is free
        assert key(got_pairs) == key(pairs)


# -- refusals --------------------------------------------------------------------------
def test_halo_below_required_is_refused():
    kernel = ClassicalInstances(threshold=0.5, sigma=1.0, max_diameter=20, min_distance=4)
    assert kernel.required_halo == 2 * 20 + 10 + 4 + 4
    img, ok = _dask(np.zeros((1, 64, 64), np.float32), np.ones((64, 64), bool), 32)
    with pytest.raises(ConfigError, match=r"halo 57 px is below the 58 px"):
        instance_labels(img, ok, kernel, kernel.required_halo - 1)
    with pytest.raises(ConfigError, match="iou_threshold"):
        instance_labels(img, ok, kernel, kernel.required_halo, iou_threshold=0.3)


def test_physical_units_convert_with_the_pixel_size_and_need_it():
    with pytest.raises(ConfigError, match="pixel_size"):
        ClassicalInstances(threshold=0.5, units="um", max_diameter=10)
    um = ClassicalInstances(threshold=0.4, units="um", pixel_size=0.5, sigma=0.5, max_diameter=9,
                            min_distance=2, min_size=2.5)  # fmt: skip
    px = ClassicalInstances(threshold=0.4, sigma=1.0, max_diameter=18, min_distance=4, min_size=10)
    assert (um.sigma_px, um.max_diameter_px, um.min_distance_px, um.min_size_px) == (1.0, 18, 4, 10)
    assert um.required_halo == px.required_halo
    image, _ = crowded_nuclei(80, 80, 20, seed=4)
    valid = np.ones((80, 80), bool)
    np.testing.assert_array_equal(um(image, valid), px(image, valid))


def test_bad_kernel_output_and_unset_threshold_are_refused():
    img, ok = _dask(np.zeros((1, 32, 32), np.float32), np.ones((32, 32), bool), 16)
    with pytest.raises(InputError, match="shape"):
        instance_labels(img, ok, lambda b, v: np.zeros((3, 3), np.int64), 2)
    with pytest.raises(InputError, match="integer"):
        instance_labels(img, ok, lambda b, v: np.zeros(v.shape, np.float32), 2)
    with pytest.raises(ConfigError, match="threshold is not set"):
        ClassicalInstances()(np.zeros((1, 8, 8), np.float32), np.ones((8, 8), bool))
    with pytest.raises(InputError, match="bands"):
        dataclasses.replace(ClassicalInstances(threshold=0.1), bands=(2,))(np.zeros((1, 8, 8)), np.ones((8, 8), bool))


def test_provisional_ids_never_overflow():
    big = 2**62
    with pytest.raises(InputError, match="64-bit"):
        merge_plan(np.array([[big, big]]), np.zeros((0, 4), np.int64), ((4,), (4, 4)))
