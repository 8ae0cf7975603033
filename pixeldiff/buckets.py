"""Aspect-ratio buckets (`data.buckets: aspect`): the sizes of a stage, which one an image goes to, and what its crop
keeps. Pure arithmetic, no torch: the manifest's validation uses it on the login node."""

from __future__ import annotations

import math


MIN_BUCKET_AREA = 0.9  # a bucket keeps at least this fraction of the stage's pixel area


def bucket_sizes(resolution: int, patch: int, max_aspect: float = 2.0) -> tuple[tuple[int, int], ...]:
    """The aspect-ratio buckets of a stage: (h, w) sizes, each side a multiple of `patch`, of about the stage's pixel
    area (between MIN_BUCKET_AREA and 1 times resolution^2, never more), aspect up to `max_aspect`:1 either way;
    ordered from the tallest to the widest. For each height h (a multiple of the patch, up to the resolution) the
    widest w that keeps the area and the aspect limit, and its transpose: 512 px, patch 32 gives 11 buckets from
    352x704 through 512x512 to 704x352."""
    area = resolution * resolution
    out = set()
    for h in range(patch, resolution + 1, patch):
        w = min(area // h, int(max_aspect * h)) // patch * patch
        if w >= h and h * w >= MIN_BUCKET_AREA * area:
            out.update({(h, w), (w, h)})
    return tuple(sorted(out, key=lambda s: s[1] / s[0]))


def nearest_bucket(w: int, h: int, sizes) -> int:
    """The index of the bucket whose aspect is nearest the image's, on a log scale (2:1 and 1:2 are as far from
    1:1); the first of equals."""
    a = math.log(w / h)
    return min(range(len(sizes)), key=lambda i: abs(a - math.log(sizes[i][1] / sizes[i][0])))


def kept_fraction(w: int, h: int, bw: int, bh: int) -> float:
    """The fraction of a w x h image's pixels that a resize to cover bw x bh and a centre crop keeps."""
    s = max(bw / w, bh / h)
    return min(1.0, (bw * bh) / (w * h * s * s))
