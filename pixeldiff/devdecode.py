"""JPEG decoding on the training device (`data.decode: device`): nvJPEG on a GPU, libjpeg-turbo on the CPU.

With it the DataLoader workers only read a JPEG's header (size, the checks, the bucket, the crop box, the flip) and
send its bytes, all of a micro-batch's in one tensor; the training process decodes them in one call (torchvision's
batched `decode_jpeg`), crops each to its box and resizes it (bicubic, antialiased) into the batch's uint8 image
tensor on the device. Other formats, and CMYK JPEGs (which nvJPEG does not decode), are still decoded in the
workers. A JPEG the device's decoder rejects is decoded on the CPU instead; one that does not decode there either is
counted `corrupt_image`, like one the workers find, and its slot takes the first good sample of the batch (image,
caption, key and embedding together), so every batch keeps its size; a batch with no good image is dropped.

On a GPU the work runs on a stream of its own: torchvision's CUDA decoder writes its outputs from nvJPEG's stream
without waiting for the stream it allocated them on, so memory just freed by the training step's queued kernels must
not be handed to it. The side stream's own earlier work (the previous batch's resizes, long done) is waited for
first, the training stream waits for the side stream's result, and the image tensor is marked used on both.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

FATAL = tuple(e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None)) if e)
_SIDE: dict = {}  # device -> its decode stream


def _decode(data, device: torch.device):
    """torchvision's `decode_jpeg` (one tensor of bytes or a list) to RGB on `device`."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs for torchcodec's; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _one(data: torch.Tensor, device: torch.device):
    """One JPEG on `device`, from the CPU's decoder when the device's rejects it; None when neither decodes it."""
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return _decode(data, where).to(device)
        except RuntimeError as e:
            if isinstance(e, FATAL):  # out of memory, a broken device: not the image's fault
                raise
    return None


def _decode_all(datas: list, device: torch.device) -> list:
    """Each JPEG decoded to (3, h, w) uint8 on `device`, or None where its data do not decode."""
    try:
        return list(_decode(datas, device))
    except RuntimeError as e:  # one bad image fails the batched call: decode them one by one
        if isinstance(e, FATAL):
            raise
        return [_one(d, device) for d in datas]


def crop_resize(img: torch.Tensor, box: tuple, size: tuple, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8: the box (left, top, right, bottom) resized to `size` (h, w). A reduction
    by more than 8x is done in two steps, an area average to four times the size and then the bicubic one (CUDA's
    antialiased bicubic refuses reductions beyond about 47x; at 4x the two steps give the pixels of one)."""
    left, top, right, bottom = box
    x = img[None, :, top:bottom, left:right].float()
    h, w = size
    if x.shape[-2] > 8 * h or x.shape[-1] > 8 * w:
        x = torch.nn.functional.interpolate(x, size=(min(x.shape[-2], 4 * h), min(x.shape[-1], 4 * w)), mode="area")
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    x = x[0].clamp_(0, 255).round_().to(torch.uint8)
    return x.flip(-1) if flip else x


def _side_stream(device: torch.device):
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def decode_jpegs(batch: dict, device: torch.device) -> int | None:
    """Fill the slots of `batch["jpeg"]` (removed) in `batch["image"]` (moved to `device`); take the failed ones'
    crop fractions out of the batch's `kept` sums. -> the number of JPEGs that did not decode (their slots now hold a
    copy of the first good sample), or None when no image of the batch is good (drop the batch)."""
    job = batch.pop("jpeg")
    data, starts = job["data"], [0, *job["ends"][:-1]]
    datas = [data[a:b] for a, b in zip(starts, job["ends"])]
    side = _side_stream(device) if device.type == "cuda" else None
    if side is not None:
        side.synchronize()  # its last work: the previous batch's resizes; their blocks may be reused now
    with torch.cuda.stream(side) if side is not None else nullcontext():
        images = batch["image"].to(device, non_blocking=True)
        size = tuple(images.shape[-2:])
        bad = set()
        for j, box, flip, img in zip(job["slots"], job["boxes"], job["flips"], _decode_all(datas, device)):
            if img is None:
                bad.add(j)
            else:
                images[j] = crop_resize(img, box, size, flip)
        good = [j for j in range(len(images)) if j not in bad]
        for j in sorted(bad) if good else ():
            images[j] = images[good[0]]
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
        images.record_stream(torch.cuda.current_stream(device))
    batch["image"] = images
    if bad and not good:
        return None
    lost = [kept for j, kept in zip(job["slots"], job["kept"]) if j in bad]
    batch["kept"] -= sum(k for k, _ in lost)
    batch["kept_square"] -= sum(k for _, k in lost)
    for j in bad:
        for k in ("caption", "key", "emb", "mask"):
            if k in batch:
                batch[k][j] = batch[k][good[0]]
    return len(bad)
