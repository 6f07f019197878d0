"""Stage near_duplicates: the decoded cache -> `data/near_duplicates.csv` (path, label, cluster, cluster_size).

A near-duplicate is the same picture saved again: re-compressed, re-sized a little, re-saved
in another format. Validate's sha256 sees only identical bytes; this stage compares what the
images look like. Each valid image becomes an 8x8 grayscale thumbnail (the mean of each
1/8 x 1/8 block of its cached pixels: the cache has already decoded and resized it, so nothing
is decoded here), and two images are near-duplicates when their thumbnails differ by at most
`validate.near_duplicate_distance` gray levels, root mean square over the 64 cells (0 turns the
stage off: every image is its own cluster). Clusters are the connected components of those
pairs. The split keeps each cluster in one split; a cluster whose images carry two labels is
a label conflict, counted in `metrics/near_duplicates.json`.

Why not a 64-bit perceptual hash (pHash) and Hamming bits: its bits are signs against the
median of 64 DCT coefficients, and on small, similar images the signs say too little. Measured
on real sets of small images (README, near-duplicates), no Hamming distance kept distinct
images apart and JPEG copies together: scikit-learn's digits clustered 5% of distinct images at
the distance that still missed 16% of JPEG q70 copies; flat tiles (sky) changed 20 of 64 bits
after JPEG. The thumbnails' gray-level distance keeps magnitudes and separates both.

The search is exact and avoids comparing every pair: the thumbnails' projection on their
leading principal axes never lengthens a difference, so a k-d tree over the projections finds
every pair that can be within the distance, and each candidate is then checked in full.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from tasks.files import read_csv, write_csv, write_json
from tasks.params import ValidateParams

log = logging.getLogger("imgclf")

THUMBNAIL = 8  # cells a side
SEARCH_AXES = 8  # principal axes the k-d tree searches; more prune better, fewer keep the tree fast
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L" and OpenCV's gray


def thumbnails(images: np.ndarray) -> np.ndarray:
    """Returns (N, 64) float32 grayscale 8x8 thumbnails of uint8 images (N, height, width, channels)."""
    cells = np.empty((len(images), THUMBNAIL, THUMBNAIL, images.shape[3]), dtype=np.float32)
    for row, image in enumerate(images):  # OpenCV's area resampling: ~15 us an image, memmap rows paged in order
        cells[row] = cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).reshape(cells.shape[1:])
    gray = cells @ LUMA if images.shape[3] == 3 else cells[..., 0]
    return gray.reshape(len(images), THUMBNAIL * THUMBNAIL)


def close_pairs(thumbs: np.ndarray, distance: float) -> np.ndarray:
    """Returns (M, 2) row pairs i < j whose thumbnails differ by at most `distance` gray levels RMS, sorted."""
    if len(thumbs) < 2 or distance <= 0:
        return np.empty((0, 2), dtype=np.int64)
    radius = distance * math.sqrt(thumbs.shape[1])  # RMS over the cells -> Euclidean length
    centred = thumbs - thumbs.mean(axis=0)
    # The principal axes from the 64x64 covariance: an SVD of the whole (N, 64) array costs 100x more.
    axes = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :SEARCH_AXES]
    from scipy.spatial import cKDTree  # SciPy loads only when a stage needs it, not with every command

    # A hair wider: float32 axes are orthonormal to ~1e-6, and every candidate is checked below anyway.
    candidates = cKDTree(centred @ axes).query_pairs(radius * (1 + 1e-4), output_type="ndarray")
    if not len(candidates):
        return np.empty((0, 2), dtype=np.int64)
    lengths = np.linalg.norm(thumbs[candidates[:, 0]] - thumbs[candidates[:, 1]], axis=1)
    pairs = np.sort(candidates[lengths <= radius], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _linking_pairs(thumbs: np.ndarray, distance: float) -> np.ndarray:
    """Returns pairs that link the rows as close_pairs would, for clustering: among k images with one
    thumbnail (blank tiles, black frames) k - 1 links, where every pair would be k^2 / 2 in memory."""
    distinct, first, same = np.unique(thumbs, axis=0, return_index=True, return_inverse=True)
    to_first = np.column_stack([first[same.ravel()], np.arange(len(thumbs))])
    return np.vstack([first[close_pairs(distinct, distance)], to_first[to_first[:, 0] != to_first[:, 1]]])


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Returns each of n items' cluster: the connected components of `pairs`, numbered in order of first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_duplicates(params: ValidateParams, cache_dir: Path, out_csv: Path, metrics_json: Path) -> Path:
    """Returns `out_csv`: every cached image with its near-duplicate cluster; the counts go to `metrics_json`."""
    index = sorted(read_csv(cache_dir / "index.csv"), key=lambda entry: int(entry["row"]))  # images.npy's order
    started = time.perf_counter()
    distance = params.near_duplicate_distance
    pairs = np.empty((0, 2), dtype=np.int64)
    if distance > 0:
        pairs = _linking_pairs(thumbnails(np.load(cache_dir / "images.npy", mmap_mode="r")), distance)
    cluster = clusters(len(index), pairs)
    sizes = np.bincount(cluster, minlength=len(index))
    labels_of: dict[int, set[str]] = defaultdict(set)
    for entry, found in zip(index, cluster):
        if sizes[found] > 1:
            labels_of[int(found)].add(entry["label"])
    write_csv(out_csv, ["path", "label", "cluster", "cluster_size"],
              ([entry["path"], entry["label"], int(found), int(sizes[found])] for entry, found in zip(index, cluster)))
    summary = {
        "distance": distance,
        "images": len(index),
        "clusters": len(labels_of),  # of two images or more
        "images_in_clusters": int(sizes[sizes > 1].sum()),
        "largest_cluster": int(sizes.max(initial=0)),
        "clusters_spanning_classes": sum(1 for labels in labels_of.values() if len(labels) > 1),
    }
    write_json(metrics_json, summary)
    if distance <= 0:
        log.info("near_duplicates: off (validate.near_duplicate_distance: 0); %d images, each its own cluster", len(index))
    else:
        log.info("near_duplicates: %d images, %d clusters of near-duplicates (%d images, the largest %d) within %g "
                 "gray levels, %d spanning classes, in %.1fs", summary["images"], summary["clusters"],
                 summary["images_in_clusters"], summary["largest_cluster"], distance,
                 summary["clusters_spanning_classes"], time.perf_counter() - started)  # fmt: skip
    return out_csv
