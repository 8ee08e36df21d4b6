"""cluster.compute returns results in argument order, also for mixed collection types."""

import dask
import dask.array as da
import numpy as np

from pipeline.cluster import compute


def test_mixed_arrays_and_delayed_come_back_in_order():
    # Dask 2026.8's own compute returns (array, array, delayed) for (array, delayed, array)
    a = da.ones((4, 4), chunks=2)
    b = dask.delayed(lambda: "delayed")()
    c = da.zeros((3, 3), chunks=3)
    d = dask.delayed(lambda: 7)()
    got = compute(a, b, c, d, label="mixed", progress=False)
    assert got[0].shape == (4, 4) and got[1] == "delayed" and got[2].shape == (3, 3) and got[3] == 7
    np.testing.assert_array_equal(got[0], np.ones((4, 4)))


def test_mixed_order_on_a_distributed_client():
    from distributed import Client, LocalCluster

    a = da.arange(6, chunks=3)
    b = dask.delayed(lambda: "delayed")()
    c = da.zeros((2, 2), chunks=1)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster):
        got = compute(a, b, c, label="mixed", progress=False)
    np.testing.assert_array_equal(got[0], np.arange(6))
    assert got[1] == "delayed" and got[2].shape == (2, 2)
