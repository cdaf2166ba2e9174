"""Uploaded images, checked before a job is queued.

An upload is a NIfTI-1/2 file, raw or gzip-compressed. It is streamed to a file the server
names itself (the client's file name is never used), kept compressed (a gzip upload as
received, a raw one compressed on the way) and inflated alongside with a running count. The header
is read first: the voxel count and dimensions must be within the worker's caps, and the
decompressed stream may not run past the size the header declares - a decompression bomb
is stopped after a few bytes too many, never inflated. So that the declared size is itself
bounded, the header may not put the voxels more than :data:`MAX_OFFSET` bytes in (NIfTI
extensions are small) nor use voxel types wider than 8 bytes (complex, RGB, float128). The file is then read with the
library's :func:`~LongitudinalDiffusionLib.imaging.load_image`, which refuses 4D data,
NaN/Inf voxels, broken affines and absurd spacing.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..imaging import load_image

log = logging.getLogger(__name__)

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
#: largest offset of the voxel data (header + extensions) accepted
MAX_OFFSET = 1 << 20


class UploadRejected(InputError):
    """An upload the worker will not take; ``status`` is the HTTP status to answer with."""

    def __init__(self, source: str, problem: str, status: int = 422) -> None:
        super().__init__(source, problem)
        self.status = status


def _header(head: bytes, name: str) -> nib.Nifti1Header:
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        if len(head) < cls.template_dtype.itemsize:
            continue
        try:
            hdr = cls.from_fileobj(io.BytesIO(head[: cls.template_dtype.itemsize]), check=True)
        except Exception as exc:  # nibabel raises several kinds of errors for a foreign header
            log.debug("%s: not a %s (%s: %s)", name, cls.__name__, type(exc).__name__, exc)
            continue
        return hdr
    raise UploadRejected(name, "not a NIfTI image (no valid NIfTI-1 or NIfTI-2 header)")


def store_upload(
    src: BinaryIO,
    dest: Path,
    name: str,
    *,
    max_voxels: int,
    max_dim: int,
    ndim: int = 3,
    labels: bool = False,
    max_bytes: int | None = None,
    budget: str = "",
) -> int:
    """Stream an upload into ``dest`` (a ``.nii.gz`` file: a gzip upload is kept as received,
    a raw one compressed on the way), inflating it alongside to check it with a running count
    of the decompressed bytes, then read it with the library's checks.

    ``max_bytes`` bounds the decompressed size (header and voxels); ``budget`` says which
    limit it is, for the message. Returns the decompressed size.

    Raises:
        UploadRejected: with status 413 for images beyond the caps, else 422.
    """
    first = src.read(2)
    gz = first == GZIP_MAGIC
    state = {"limit": None, "total": 0, "head": b""}

    def count(data: bytes) -> None:
        """The running count of decompressed bytes against the header's and the worker's limits."""
        if state["limit"] is None:
            state["head"] += data[: max(0, 540 - len(state["head"]))]
            if len(state["head"]) >= 348:
                limit = _limit(_header(state["head"], name), name, max_voxels, max_dim, ndim)
                if max_bytes is not None and limit > max_bytes:
                    raise UploadRejected(
                        name,
                        f"decompressed size {limit / 2**20:.1f} MB exceeds this worker's limit of "
                        f"{max_bytes / 2**20:.1f} MB{budget}",
                        413,
                    )
                state["limit"] = limit
        state["total"] += len(data)
        if state["limit"] is not None and state["total"] > state["limit"]:
            raise UploadRejected(
                name,
                "holds more data than its header declares " + ("(a decompression bomb?)" if gz else "(trailing bytes)"),
                413 if gz else 422,
            )

    def room() -> int:  # never inflate more than the header allows (plus one byte to notice)
        limit = state["limit"]
        return CHUNK if limit is None else max(1, min(CHUNK, limit + 1 - state["total"]))

    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
    try:
        with open(dest, "wb") as raw_out:
            packer = None if gz else gzip.GzipFile(fileobj=raw_out, mode="wb", compresslevel=1, mtime=0)
            chunk = first
            while chunk:
                if inflater is None:
                    count(chunk)
                    packer.write(chunk)
                else:
                    raw_out.write(chunk)  # kept compressed, as received
                    pending = chunk
                    while pending:
                        try:
                            data = inflater.decompress(pending, room())
                        except zlib.error as exc:
                            raise UploadRejected(name, f"corrupt gzip stream ({exc})") from exc
                        pending = inflater.unconsumed_tail
                        if inflater.eof and inflater.unused_data:  # a gzip file of several members
                            pending = inflater.unused_data + pending
                            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        count(data)
                chunk = src.read(CHUNK)
            if packer is not None:
                packer.close()
            total, limit = state["total"], state["limit"]
            if inflater is not None and not inflater.eof and total > 0 and (limit is None or total < limit):
                raise UploadRejected(name, "file is truncated: the compressed stream ends early")
        total, limit = state["total"], state["limit"]
        if total == 0:
            raise UploadRejected(name, "file is empty")
        if limit is None:
            raise UploadRejected(name, "not a NIfTI image (shorter than a NIfTI header)")
        if total < limit:
            raise UploadRejected(name, f"file is truncated: {total} of the {limit} bytes its header declares")
        try:
            image = load_image(dest, dtype=np.int16 if labels else np.float32)
        except InputError as exc:  # the problem, without the server's path (nibabel may quote it)
            raise UploadRejected(name, exc.problem.replace(str(dest), name)) from exc
        del image
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return total


def _limit(hdr: nib.Nifti1Header, name: str, max_voxels: int, max_dim: int, ndim: int) -> int:
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if any(s < 1 for s in shape):
        raise UploadRejected(name, f"image has a zero-size dimension (shape {shape})")
    kept = shape
    while len(kept) > ndim and kept[-1] == 1:
        kept = kept[:-1]
    if len(kept) > ndim:
        raise UploadRejected(name, f"{len(kept)}D image (shape {shape}) where a single {ndim}D volume is needed")
    if max(shape) > max_dim:
        raise UploadRejected(name, f"image extent {max(shape)} voxels exceeds this worker's limit of {max_dim}", 413)
    nvox = int(np.prod(shape, dtype=np.int64))
    if nvox > max_voxels:
        raise UploadRejected(name, f"image of {nvox} voxels exceeds this worker's limit of {max_voxels}", 413)
    try:
        dtype = hdr.get_data_dtype()
    except (KeyError, ValueError, nib.spatialimages.HeaderDataError):
        # nibabel's KeyError names only the datatype code; the message says what it means
        raise UploadRejected(name, "unknown voxel type in the header") from None
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise UploadRejected(name, f"voxel type {dtype} is not supported (integers or floats of up to 8 bytes)")
    offset = int(hdr.get_data_offset()) or hdr.template_dtype.itemsize
    if offset > MAX_OFFSET:
        raise UploadRejected(name, f"header puts the voxels {offset} bytes in (at most {MAX_OFFSET} accepted)", 413)
    return offset + nvox * dtype.itemsize
