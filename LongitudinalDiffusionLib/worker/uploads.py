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


class _Count:
    """The running count of an upload's decompressed bytes against the limit its header
    declares (known once the first 348 bytes are in) and the worker's ``max_bytes``."""

    def __init__(self, name: str, gz: bool, caps: tuple[int, int, int], max_bytes: int | None, budget: str) -> None:
        self.name, self.gz, self.caps, self.max_bytes, self.budget = name, gz, caps, max_bytes, budget
        self.limit: int | None = None  # header + voxels, as the header declares
        self.total = 0
        self.head = b""

    def add(self, data: bytes) -> None:
        if self.limit is None:
            self.head += data[: max(0, 540 - len(self.head))]
            if len(self.head) >= 348:
                self.limit = self._header_limit()
        self.total += len(data)
        if self.limit is not None and self.total > self.limit:
            raise UploadRejected(
                self.name,
                "holds more data than its header declares "
                + ("(a decompression bomb?)" if self.gz else "(trailing bytes)"),
                413 if self.gz else 422,
            )

    def _header_limit(self) -> int:
        max_voxels, max_dim, ndim = self.caps
        limit = _limit(_header(self.head, self.name), self.name, max_voxels, max_dim, ndim)
        if self.max_bytes is not None and limit > self.max_bytes:
            raise UploadRejected(
                self.name,
                f"decompressed size {limit / 2**20:.1f} MB exceeds this worker's limit of "
                f"{self.max_bytes / 2**20:.1f} MB{self.budget}",
                413,
            )
        return limit

    def room(self) -> int:
        """How much to inflate next: never more than the header allows (plus one byte to notice)."""
        return CHUNK if self.limit is None else max(1, min(CHUNK, self.limit + 1 - self.total))

    def short(self) -> bool:
        """Whether fewer bytes came than the header declares (or no header yet)."""
        return self.limit is None or self.total < self.limit


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
    counter = _Count(name, first == GZIP_MAGIC, (max_voxels, max_dim, ndim), max_bytes, budget)
    try:
        with open(dest, "wb") as out:
            if counter.gz:
                _copy_gzip(src, first, out, counter)
            else:
                _copy_raw(src, first, out, counter)
        _check_complete(counter)
        try:
            load_image(dest, dtype=np.int16 if labels else np.float32)
        except InputError as exc:  # the problem, without the server's path (nibabel may quote it)
            raise UploadRejected(name, exc.problem.replace(str(dest), name)) from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return counter.total


def _copy_raw(src: BinaryIO, first: bytes, out: BinaryIO, counter: _Count) -> None:
    """A raw upload: counted and compressed into ``out`` on the way."""
    packer = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0)
    chunk = first
    while chunk:
        counter.add(chunk)
        packer.write(chunk)
        chunk = src.read(CHUNK)
    packer.close()


def _copy_gzip(src: BinaryIO, first: bytes, out: BinaryIO, counter: _Count) -> None:
    """A gzip upload: kept in ``out`` as received, inflated alongside (never beyond the count's room)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    chunk = first
    while chunk:
        out.write(chunk)  # kept compressed, as received
        pending = chunk
        while pending:
            try:
                data = inflater.decompress(pending, counter.room())
            except zlib.error as exc:
                raise UploadRejected(counter.name, f"corrupt gzip stream ({exc})") from exc
            pending = inflater.unconsumed_tail
            if inflater.eof and inflater.unused_data:  # a gzip file of several members
                pending = inflater.unused_data + pending
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            counter.add(data)
        chunk = src.read(CHUNK)
    if not inflater.eof and counter.total > 0 and counter.short():
        raise UploadRejected(counter.name, "file is truncated: the compressed stream ends early")


def _check_complete(counter: _Count) -> None:
    """The upload held a header and exactly the bytes it declares."""
    name, total, limit = counter.name, counter.total, counter.limit
    if total == 0:
        raise UploadRejected(name, "file is empty")
    if limit is None:
        raise UploadRejected(name, "not a NIfTI image (shorter than a NIfTI header)")
    if total < limit:
        raise UploadRejected(name, f"file is truncated: {total} of the {limit} bytes its header declares")


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
