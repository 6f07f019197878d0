"""Near-duplicate search time against validate's, on a malaria-sized set, measured in one run.

Builds (once, then reuses: bench_cache.py's set) 27,558 PNG cells of 100-200 px in two class
folders, runs validate (timed: the baseline), then cache (needed, not timed), then the
near_duplicates stage at `validate.near_duplicate_distance` (timed: reading the cache, the
thumbnails, the pair search, the clusters and their CSV). Target: near_duplicates under 20% of
validate's time. Also prints how the pair search scales: the same thumbnails searched by the
stage's k-d tree and by comparing every pair (blocks of a Gram matrix), and checks both find
the same pairs.

    python benchmarks/bench_near_duplicates.py [--images 27558] [--size 64] [--distance 4] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def every_pair(thumbs, distance: float, block: int = 1024):
    """Returns the pairs within `distance` (RMS) found by comparing every pair: the quadratic baseline."""
    import numpy as np

    squares = (thumbs.astype(np.float64) ** 2).sum(axis=1)
    limit = distance**2 * thumbs.shape[1]
    found = []
    for start in range(0, len(thumbs), block):
        gram = thumbs[start : start + block].astype(np.float64) @ thumbs[start:].T.astype(np.float64)
        lengths = squares[start : start + block, None] + squares[None, start:] - 2 * gram
        i, j = np.nonzero(lengths <= limit)
        keep = j > i
        found.append(np.stack([start + i[keep], start + j[keep]], axis=1))
    pairs = np.concatenate(found)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def main() -> None:
    import numpy as np

    from bench_cache import build_set
    from tasks.cache import cache
    from tasks.near_duplicates import close_pairs, near_duplicates, thumbnails
    from tasks.params import PrepareParams, ValidateParams
    from tasks.validate import validate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=27_558)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--distance", type=float, default=ValidateParams().near_duplicate_distance)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".data" / "cells")
    args = parser.parse_args()
    data = build_set(args.data, args.images)
    params = ValidateParams(near_duplicate_distance=args.distance)
    with tempfile.TemporaryDirectory(prefix="bench-near-duplicates-") as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        manifest = validate(params, data, work / "manifest.csv")
        validate_s = time.perf_counter() - started
        cache(PrepareParams(image_size=args.size), manifest, data, work / "cache")
        started = time.perf_counter()
        near_duplicates(params, work / "cache", work / "near_duplicates.csv", work / "near_duplicates.json")
        near_s = time.perf_counter() - started
        thumbs = thumbnails(np.load(work / "cache" / "images.npy"))

    started = time.perf_counter()
    tree_pairs = close_pairs(thumbs, args.distance)
    tree_s = time.perf_counter() - started
    started = time.perf_counter()
    brute_pairs = every_pair(thumbs, args.distance)
    brute_s = time.perf_counter() - started
    same = np.array_equal(tree_pairs, brute_pairs)

    print(f"near-duplicates benchmark: {len(thumbs)} images at {args.size}x{args.size}, distance {args.distance:g}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"validate         {validate_s:7.1f} s  (baseline)")
    print(f"near_duplicates  {near_s:7.1f} s  {near_s / validate_s:6.1%} of validate (target < 20%)")
    print(f"pair search: k-d tree {tree_s:.2f} s, every pair {brute_s:.2f} s ({brute_s / tree_s:.1f}x); "
          f"{len(tree_pairs)} pairs, {'the same' if same else 'DIFFERENT'} pairs")  # fmt: skip
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
