"""tileseg: tiled, chunk-invariant segmentation of rasters far larger than memory.

The library never imports Prefect; ``flows/`` wraps its stages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tileseg")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
