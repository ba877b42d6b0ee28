"""``data.decode=nvjpeg``: JPEGs are decoded, cropped and resized by the training process, on its device.

Split of the work:

* **loader workers** (:class:`JpegRows`) do not decode a JPEG: they read its size and EXIF
  orientation from the header (``PIL.Image.open`` reads the markers up to the frame header, no
  pixel data), draw the sample's crop and flip from the per-sample ``random.Random`` the CPU path
  uses (:meth:`~tldist.data.transforms.TrainTransform.draw`, same draws in the same order, so
  augmentation stays seeded and resumable) and ship the encoded bytes with those parameters in
  the batch's ``_jpeg`` field. Other images (PNG, WebP, BMP..., CMYK JPEGs) are decoded in the
  worker with ``data.decode=torchvision``'s decoder and transform, into the batch's ``image`` rows.
* **the training process** calls :func:`images_on` ``(batch, device)``: one batched
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg on CUDA, libjpeg-turbo on CPU), the
  EXIF orientation, then per image the very crop + resize (torchvision.transforms.v2, antialiased)
  or eval resize + center crop that the CPU path runs, on the device.

Pixels: the geometry is the CPU path's own code (crop, then resize the crop), so on a CPU device
the batch is **bit-identical** to ``data.decode=torchvision`` (same libjpeg-turbo decoder; tested).
Against ``data.decode=pil`` it differs as ``torchvision`` does (PIL's resampler; mean |diff| < 3
levels). On CUDA, nvjpeg's IDCT and chroma upsampling and the GPU resize kernels' rounding differ
from libjpeg-turbo / the CPU kernels by a few levels (``bench/gpu_check.py`` measures it).

A JPEG whose header reads but whose data the device decoder rejects is retried on the CPU; if that
fails too its row becomes a zero image (with ``mask`` False in eval batches) and a warning names it:
unlike CPU decoding it can no longer be skipped, the batch being already formed (shards written by
``tldist shards write`` were decoded when written; ``tldist shards verify`` checks a set).
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any, Optional

import torch
from PIL import Image

from tldist.data.stream import Throttle
from tldist.data.transforms import TrainTransform, exif_orientation

CPU_DECODER = "torchvision"
"""The worker-side decoder of ``data.decode=nvjpeg`` for images the device does not decode."""
JPEG_MODES = ("RGB", "L")
"""PIL modes of the JPEGs shipped undecoded (YCbCr and grayscale); CMYK/YCCK are decoded in the worker."""

_throttle = Throttle()


def worker_decoder(decode: str) -> str:
    """The ``decode_image`` decoder loader workers run for a ``data.decode`` value."""
    return CPU_DECODER if decode == "nvjpeg" else decode


def jpeg_header(data: bytes) -> Optional[tuple[int, int, int]]:
    """``(width, height, orientation)`` of a JPEG the device decodes, size *after* the EXIF
    orientation (1..8; 5..8 swap width and height); None for other formats, CMYK JPEGs and JPEGs
    that do not end with the EOI marker (truncated files, or trailing data: the worker decodes
    those, so a truncated one is skipped and counted as with CPU decoding).

    Reads the header only (~30 us). Raises PIL's errors for bytes that are not a readable JPEG.
    """
    if data[:3] != b"\xff\xd8\xff" or data[-64:].rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    img = Image.open(io.BytesIO(data), formats=("JPEG", "MPO"))
    if img.mode not in JPEG_MODES:
        return None
    orientation = exif_orientation(img)
    width, height = img.size
    return (height, width, orientation) if orientation >= 5 else (width, height, orientation)


class JpegRows:
    """The JPEGs of the batch a loader worker is filling, left undecoded for :func:`images_on`.

    ``transform`` is the loader's train or eval transform (it travels with the batch).
    """

    def __init__(self, transform: Any):
        self.transform = transform
        self.chunks: list[bytes] = []
        self.rows: list[int] = []
        self.meta: list[tuple[int, ...]] = []  # (orientation, top, left, h, w, flip); eval: (orientation,)

    def add(self, row: int, data: bytes, rng: Optional[random.Random]) -> bool:
        """Take the image ``data`` of batch row ``row`` if it is a JPEG the device decodes: its crop
        and flip are drawn from ``rng`` (train; None for eval) now, as the CPU path would. False, with
        nothing drawn, for other images (decode them in the worker). Raises PIL's errors for a bad header."""
        head = jpeg_header(data)
        if head is None:
            return False
        width, height, orientation = head
        params = self.transform.draw(width, height, rng) if rng is not None else ()
        self.chunks.append(data)
        self.rows.append(row)
        self.meta.append((orientation, *(int(p) for p in params)))
        return True

    def take(self) -> dict[str, Any]:
        """The batch fields for the rows taken so far (``{}`` when none), and start a new batch.

        ``_jpeg``: ``data`` uint8 [total bytes] (the JPEGs back to back), ``offsets`` int64 [n+1],
        ``rows`` int64 [n] (batch rows), ``meta`` int64 [n, 1 or 6] (orientation, then the train crop
        ``top, left, h, w`` in px of the oriented image and ``flip``), ``transform``.
        """
        if not self.rows:
            return {}
        lengths = torch.tensor([0] + [len(c) for c in self.chunks], dtype=torch.int64)
        fields = {"data": torch.frombuffer(bytearray(b"".join(self.chunks)), dtype=torch.uint8),
                  "offsets": lengths.cumsum(0), "rows": torch.tensor(self.rows, dtype=torch.int64),
                  "meta": torch.tensor(self.meta, dtype=torch.int64), "transform": self.transform}
        self.chunks, self.rows, self.meta = [], [], []
        return {"_jpeg": fields}


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] image as displayed: EXIF ``orientation`` (1..8) applied as PIL's ``exif_transpose``."""
    if orientation >= 5:  # 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise
        img = img.transpose(-1, -2)
    dims = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return img.flip(dims) if dims else img


def _decode_here(chunks: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Each JPEG as uint8 [3, H, W] on ``device`` as stored (no orientation), None if undecodable.
    One batched call; on failure (it returns nothing then) image by image, each retried on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)  # data.decode=nvjpeg is the user's explicit choice
    try:
        return list(decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[Optional[torch.Tensor]] = []
    for c in chunks:
        img = None
        for where in dict.fromkeys([device, torch.device("cpu")]):
            try:
                img = decode_jpeg(c, mode=ImageReadMode.RGB, device=where).to(device)
                break
            except RuntimeError:
                continue
        out.append(img)
    return out


_STREAMS: dict[torch.device, Any] = {}


def _decode(chunks: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """:func:`_decode_here`, on CUDA on a stream of its own.

    nvJPEG's hardware engine writes its outputs without waiting for work queued on the caller's
    stream, into blocks the caching allocator may just have freed on that stream while queued
    kernels still read them (pytorch/vision#9606, unfixed in torchvision; torchcodec#1634). On a
    private stream the decoder only ever gets blocks of earlier decoder outputs, and
    ``record_stream`` keeps each from reuse until the caller's stream is done with it, with no
    host synchronisation.
    """
    if device.type != "cuda":
        return _decode_here(chunks, device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    main = torch.cuda.current_stream(device)
    side = _STREAMS.get(device)
    if side is None:
        side = _STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        out = _decode_here(chunks, device)
    main.wait_stream(side)
    for img in out:
        if img is not None:
            img.record_stream(main)
    return out


def images_on(batch: dict[str, Any], device: Any) -> torch.Tensor:
    """A loader batch's uint8 [B, 3, S, S] images on ``device``, the trainer's one way to get them.

    Batches without ``_jpeg`` (every ``data.decode`` but nvjpeg) are copied (``non_blocking``).
    Otherwise the JPEG rows are decoded and transformed on ``device`` (module docstring) and the
    worker-decoded rows copied in; the batch is then updated in place: ``image`` becomes the result,
    ``_jpeg`` is removed (a second call just returns it), and an undecodable JPEG row is zeros with
    ``mask`` False when the batch has a ``mask``.
    """
    device = torch.device(device)
    jpeg = batch.pop("_jpeg", None)
    images = batch["image"]
    if jpeg is None:
        return images.to(device, non_blocking=True)
    rows = jpeg["rows"].tolist()
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    others = sorted(set(range(images.shape[0])) - set(rows))  # decoded by the worker
    if others:
        idx = torch.tensor(others, dtype=torch.int64)
        out[idx.to(device)] = images[idx].to(device, non_blocking=True)
    offsets, data = jpeg["offsets"].tolist(), jpeg["data"]
    decoded = _decode([data[offsets[k]:offsets[k + 1]] for k in range(len(rows))], device)
    transform = jpeg["transform"]
    for row, img, meta in zip(rows, decoded, jpeg["meta"].tolist()):
        if img is None:
            out[row].zero_()
            if "mask" in batch:
                batch["mask"][row] = False
            key = batch["key"][row] if "key" in batch else row
            _throttle.warn(f"data.decode=nvjpeg: JPEG of sample {key} does not decode; its batch row is zeros")
            continue
        img = orient(img, meta[0])
        if isinstance(transform, TrainTransform):
            transform.apply(img, meta[1:], out=out[row])
        else:
            transform(img, out=out[row])
    batch["image"] = out
    return out
