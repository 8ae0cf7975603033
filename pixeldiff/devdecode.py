"""JPEG decoding on the training device (`data.decode: device`): nvJPEG on a GPU, libjpeg-turbo on the CPU.

With it the DataLoader workers only read a JPEG's header (size, the checks, the bucket, the crop box, the flip) and
send its bytes; the training process decodes the batch's JPEGs in one call (torchvision's batched `decode_jpeg`),
crops each to its box and resizes it (bicubic, antialiased) into the batch's uint8 image tensor on the device. Other
formats are still decoded in the workers. A JPEG whose header reads but whose data does not decode is counted
`corrupt_image`, like one the workers find, and its slot takes the first good sample of the batch (image, caption,
key and embedding together), so every batch keeps its size; a batch with no good image is dropped.
"""

from __future__ import annotations

import warnings

import torch

TEXT_FIELDS = ("caption", "key")  # per-sample lists of a batch; "emb"/"mask" are tensors, handled below


def _decode_all(datas: list, device: torch.device) -> list:
    """Each JPEG decoded to (3, h, w) uint8 on `device`, or None where its data do not decode."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs for torchcodec's; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the batched call: find which, one by one
            out = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def crop_resize(img: torch.Tensor, box: tuple, size: tuple, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8: the box (left, top, right, bottom) resized to `size` (h, w)."""
    left, top, right, bottom = box
    x = img[None, :, top:bottom, left:right].float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    x = x[0].clamp_(0, 255).round_().to(torch.uint8)
    return x.flip(-1) if flip else x


def decode_jpegs(batch: dict, device: torch.device) -> int | None:
    """Fill the slots of `batch["jpeg"]` (removed) in `batch["image"]` (moved to `device`). -> the number of JPEGs
    that did not decode (their slots now hold a copy of the first good sample), or None when no image of the batch
    is good (drop the batch)."""
    jobs = batch.pop("jpeg")
    images = batch["image"].to(device, non_blocking=True)
    size = tuple(images.shape[-2:])
    bad = []
    for (j, _, box, flip), img in zip(jobs, _decode_all([d for _, d, _, _ in jobs], device)):
        if img is None:
            bad.append(j)
        else:
            images[j] = crop_resize(img, box, size, flip)
    batch["image"] = images
    if bad:
        good = [j for j in range(len(images)) if j not in set(bad)]
        if not good:
            return None
        donor = good[0]
        for j in bad:
            images[j] = images[donor]
            for k in TEXT_FIELDS:
                batch[k][j] = batch[k][donor]
            for k in ("emb", "mask"):
                if k in batch:
                    batch[k][j] = batch[k][donor]
    return len(bad)
