"""``.npy`` request and response bodies without a copy, without ``ast``, mostly without
parsing.

``np.load`` parses the header with ``ast.literal_eval`` and copies the data out of the
buffer: ~50 us for a 64 KiB batch on a small core, as much as the inference itself. The
header that ``np.save`` writes (format 1.0, a C-order array of a plain numeric dtype) is
matched exactly here and the array is a read-only view of the body; anything else (other
format versions, Fortran order, structured or object dtypes, a size that does not add up)
goes to ``np.load``, which reads it or explains what is wrong with it.

An application sends the same shapes over and over, and the model answers in the same
shapes, so both directions keep the headers they have seen: a known request header is one
dict lookup instead of a regex, and a response is its cached header plus the array's bytes
instead of ``np.save``'s ~30 us of header formatting. The caches are bounded
(:data:`HEADER_CACHE_SIZE` each, emptied when full), so a client sending ever-new shapes
costs memory of one cache at most.

Bodies are untrusted, and both formats declare sizes before the data: an ``.npy`` header
can claim 4·10¹² elements in a few bytes (``np.load`` allocates that before it reads), and
an ``.npz`` member can inflate a thousandfold (deflate's limit). So the declared size is
checked against what the body can hold before anything is allocated: an ``.npy`` array
must fit in the bytes after its header, and an ``.npz`` must declare no more than
``max_bytes`` uncompressed in all, is read with that bound whatever it declared, and may
only use the two compressions ``np.savez``/``np.savez_compressed`` write (bzip2 and LZMA
decompress without a bound per call in ``zipfile``). Every failure is a
:class:`NpyError` (a ``ValueError``) with a reason; :class:`NpyTooLargeError` when the
body is well-formed but asks for more than the limit.

``.npz`` is a zip of ``.npy`` members, and ``zipfile`` plus ``np.load`` cost ~0.35 ms for a
3 KB body of three small arrays: more than the inference of a small model, and more than
JSON for the same request. :func:`load_npz` therefore reads the zip's central directory
itself (fixed little-endian records), checks each member's CRC, inflates a deflated member
with a bound, and reads each member's ``.npy`` with the same view reader as a request body.
What it does not expect (zip64, encryption, a record out of place) goes to ``zipfile``,
which reads it or says what is wrong, under the same limits. :func:`dump_npz` writes the
answer's zip the same way: stored members, one CRC each, no ``zipfile`` objects.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

__all__ = [
    "HEADER_CACHE_SIZE",
    "MAX_NPZ_MEMBERS",
    "NpyError",
    "NpyTooLargeError",
    "dump_npy",
    "dump_npz",
    "load_array_body",
    "load_npy",
    "load_npz",
]

HEADER_CACHE_SIZE = 256
MAX_NPZ_MEMBERS = 64  # a model's inputs; the zip directory is parsed only below this
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"  # end of central directory record, 22 bytes + a comment
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_MAGIC_1_0 = b"\x93NUMPY\x01\x00"
_PREFIX = len(_MAGIC_1_0) + 2  # magic, then the header's length as little-endian uint16
# What np.save writes for a C-order array of bools, integers or floats.
_HEADER = re.compile(
    rb"\{'descr': '([<>|])([biuf])(\d{1,2})', 'fortran_order': False, "
    rb"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n"
)


class _Layout(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int
    nbytes: int


_read_layouts: dict[bytes, _Layout] = {}
_written_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}


class NpyError(ValueError):
    """The body is not a readable ``.npy``/``.npz``; the message says why."""


class NpyTooLargeError(NpyError):
    """The body declares more data than the limit allows."""


def load_array_body(body: bytes, max_bytes: int) -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npz`` body (by its zip signature) as arrays by name, else an ``.npy`` array."""
    if body.startswith(_ZIP_MAGIC) or body.startswith(_ZIP_END):
        return load_npz(body, max_bytes)
    return load_npy(body)


def load_npy(body: bytes) -> np.ndarray:
    """The array in ``body``; raises :class:`NpyError` for what ``np.load`` cannot read and
    for a header declaring more data than the body holds (before allocating it)."""
    fast = _view(body)
    if fast is not None:
        return fast
    stream = io.BytesIO(body)
    try:
        _check_declared_size(stream, len(body))
        stream.seek(0)
        return np.load(stream, allow_pickle=False)
    except NpyError:
        raise
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise NpyError(str(exc) or type(exc).__name__) from exc


def _check_declared_size(stream: io.BytesIO, size: int) -> None:
    """``np.load`` allocates what the header declares, then reads: refuse a header that
    declares more than the body has."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        return  # np.load refuses it without allow_pickle, before reading
    declared = math.prod(shape) * dtype.itemsize
    available = size - stream.tell()
    if declared > available:
        raise NpyError(
            f"the .npy header declares shape {shape} of {dtype}, {declared} bytes, but the "
            f"body has {available} bytes of data"
        )


def load_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` body by name (``x.npy`` is ``x``), decompressing at most
    ``max_bytes`` in all."""
    _check_member_count(body)
    fast = _read_zip(body, max_bytes)
    if fast is not None:
        return fast
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            _check_members(members, max_bytes)
            return {
                member.filename.removesuffix(".npy"): load_npy(_read_member(archive, member))
                for member in members
            }
    except NpyError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, RuntimeError,
            NotImplementedError) as exc:
        raise NpyError(f"not a readable .npz: {exc}") from exc


def _check_member_count(body: bytes) -> None:
    """``zipfile`` builds an object per directory entry: count them before it does."""
    end = body.rfind(_ZIP_END, max(0, len(body) - 22 - 0xFFFF))
    if end < 0 or len(body) < end + 22:
        raise NpyError("not a readable .npz: no zip directory at the end of the body")
    entries = int.from_bytes(body[end + 10 : end + 12], "little")
    if entries > MAX_NPZ_MEMBERS:
        raise NpyError(f".npz with {entries} members: at most {MAX_NPZ_MEMBERS}")


def _check_members(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    for member in members:
        if member.compress_type not in _ZIP_METHODS:
            raise NpyError(
                f".npz member {member.filename!r} uses zip compression {member.compress_type}: "
                "write it with np.savez or np.savez_compressed"
            )
    declared = sum(member.file_size for member in members)
    if declared > max_bytes:
        raise NpyTooLargeError(
            f".npz members declare {declared} bytes uncompressed, over the {max_bytes}-byte limit"
        )


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """At most what the member declared (``zipfile`` stops there and checks the CRC)."""
    with archive.open(member) as stream:
        data = stream.read(member.file_size + 1)
    if len(data) != member.file_size:
        raise NpyError(f".npz member {member.filename!r} is not the size it declares")
    return data


# Zip records (APPNOTE 4.3.7, 4.3.12, 4.3.16), little-endian, without their signatures.
_LOCAL = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, crc,
#                                      compressed, size, name length, extra length
_CENTRAL = struct.Struct("<4s6H3I5H2I")  # signature, made by, version, flags, method, time,
#       date, crc, compressed, size, name, extra, comment lengths, disk, internal attributes,
#       external attributes, offset of the local header
_END = struct.Struct("<4s4H2IH")  # signature, disk, cd disk, entries here, entries, cd size,
#                                   cd offset, comment length
_LOCAL_SIG, _CENTRAL_SIG = b"PK\x03\x04", b"PK\x01\x02"
_UTF8_NAMES = 0x800
_ENCRYPTED = 0x1
_ZIP64 = 0xFFFFFFFF


def _read_zip(body: bytes, max_bytes: int) -> dict[str, np.ndarray] | None:
    """The members of a plain zip (what ``np.savez``/``np.savez_compressed`` write) read
    straight from the body; None for anything else, which ``zipfile`` then reads or
    refuses. Raises :class:`NpyError` for a member that fails its CRC or size, and
    :class:`NpyTooLargeError` when the members declare more than ``max_bytes``."""
    end = body.rfind(_ZIP_END, max(0, len(body) - _END.size - 0xFFFF))
    if end < 0 or len(body) < end + _END.size:
        return None
    _, disk, cd_disk, _, entries, cd_size, cd_offset, comment = _END.unpack_from(body, end)
    if disk or cd_disk or cd_offset + cd_size != end or end + _END.size + comment != len(body):
        return None  # multi-disk, zip64 or data after the directory
    members = []
    position = cd_offset
    declared = 0
    for _ in range(entries):
        if position + _CENTRAL.size > end:
            return None
        (sig, _, _, flags, method, _, _, crc, compressed, size, name_len, extra_len,
         comment_len, _, _, _, offset) = _CENTRAL.unpack_from(body, position)
        if (sig != _CENTRAL_SIG or flags & _ENCRYPTED or method not in _ZIP_METHODS
                or _ZIP64 in (compressed, size, offset)):
            return None
        name = body[position + _CENTRAL.size : position + _CENTRAL.size + name_len]
        position += _CENTRAL.size + name_len + extra_len + comment_len
        members.append((name.decode("utf-8" if flags & _UTF8_NAMES else "cp437"),
                        method, crc, compressed, size, offset))
        declared += size
    if position != end:
        return None
    if declared > max_bytes:
        raise NpyTooLargeError(
            f".npz members declare {declared} bytes uncompressed, over the {max_bytes}-byte limit"
        )
    arrays = {}
    for name, method, crc, compressed, size, offset in members:
        if offset + _LOCAL.size > cd_offset:
            return None
        sig, *_, local_name, local_extra = _LOCAL.unpack_from(body, offset)
        start = offset + _LOCAL.size + local_name + local_extra
        stop = start + compressed
        if sig != _LOCAL_SIG or stop > cd_offset:
            return None
        if method == zipfile.ZIP_STORED:
            if compressed != size:
                return None
            data = memoryview(body)[start:stop]
        else:
            try:  # at most what the member declares, whatever the stream would inflate to
                data = zlib.decompressobj(-15).decompress(body[start:stop], size + 1)
            except zlib.error as exc:
                raise NpyError(f".npz member {name!r}: {exc}") from None
            if len(data) != size:
                raise NpyError(f".npz member {name!r} is not the size it declares")
        if zlib.crc32(data) != crc:
            raise NpyError(f".npz member {name!r} fails its CRC check")
        array = _view_of(data, body, start) if method == zipfile.ZIP_STORED else _view(data)
        arrays[name.removesuffix(".npy")] = array if array is not None else load_npy(bytes(data))
    return arrays


def _view_of(data: memoryview, body: bytes, start: int) -> np.ndarray | None:
    """:func:`_view` of a stored member: a view of the request body itself, no copy."""
    found = _layout_of(data)
    if found is None:
        return None
    layout, end = found
    return np.frombuffer(body, dtype=layout.dtype, count=layout.count,
                         offset=start + end).reshape(layout.shape)


def dump_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` of ``arrays`` by name (stored, no compression: an answer on the device's
    own network is not worth the CPU), as ``np.load`` reads it: ``name.npy`` members."""
    parts: list[bytes] = []
    directory: list[bytes] = []
    offset = 0
    for key, array in arrays.items():
        name = f"{key}.npy".encode()
        data = dump_npy(array)
        if len(data) >= _ZIP64 or offset >= _ZIP64:  # ~4 GiB: let zipfile write zip64
            return _zipped(arrays)
        crc = zlib.crc32(data)
        flags = 0 if name.isascii() else _UTF8_NAMES
        local = _LOCAL.pack(_LOCAL_SIG, 20, flags, 0, 0, 0x21, crc, len(data), len(data),
                            len(name), 0)
        directory.append(_CENTRAL.pack(_CENTRAL_SIG, 20, 20, flags, 0, 0, 0x21, crc,
                                       len(data), len(data), len(name), 0, 0, 0, 0, 0o644 << 16,
                                       offset) + name)
        parts += (local, name, data)
        offset += len(local) + len(name) + len(data)
    central = b"".join(directory)
    end = _END.pack(_ZIP_END, 0, 0, len(directory), len(directory), len(central), offset, 0)
    return b"".join((*parts, central, end))


def _zipped(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            archive.writestr(f"{key}.npy", dump_npy(array))
    return buffer.getvalue()


def dump_npy(array: np.ndarray) -> bytes:
    """``np.save``'s bytes for ``array`` (format 1.0, no pickle)."""
    if not array.flags.c_contiguous or array.dtype.kind not in "biuf":
        return _saved(array)
    key = (array.dtype.str, array.shape)
    header = _written_headers.get(key)
    if header is None:
        saved = _saved(array)
        header = saved[: len(saved) - array.nbytes]
        _remember(_written_headers, key, header)
        return saved
    return header + array.tobytes()


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _view(body: bytes) -> np.ndarray | None:
    found = _layout_of(body)
    if found is None:
        return None
    layout, end = found
    return np.frombuffer(body, dtype=layout.dtype, count=layout.count, offset=end).reshape(
        layout.shape
    )


def _layout_of(data: bytes | memoryview) -> tuple[_Layout, int] | None:
    """The layout an ``.npy``'s header (seen before, or parsed now) declares, and where its
    data starts; None when it is not the exact header ``np.save`` writes, or the data is
    truncated or followed by more bytes (``np.load`` then names the problem)."""
    if len(data) < _PREFIX or data[: len(_MAGIC_1_0)] != _MAGIC_1_0:
        return None
    end = _PREFIX + int.from_bytes(data[len(_MAGIC_1_0) : _PREFIX], "little")
    header = bytes(data[_PREFIX:end])
    layout = _read_layouts.get(header)
    if layout is None:
        layout = _parse(header)
        if layout is None:
            return None
        _remember(_read_layouts, header, layout)
    if len(data) - end != layout.nbytes:
        return None
    return layout, end


def _parse(header: bytes) -> _Layout | None:
    match = _HEADER.fullmatch(header)
    if match is None:
        return None
    order, kind, size, dims = match.groups()
    try:
        dtype = np.dtype((order + kind + size).decode())
    except TypeError:  # e.g. '<i3': not a dtype; np.load says so
        return None
    shape = tuple(int(dim) for dim in dims.split(b",") if dim.strip())
    count = 1
    for dim in shape:
        count *= dim
    return _Layout(dtype, shape, count, count * dtype.itemsize)


def _remember(cache: dict, key: object, value: object) -> None:
    if len(cache) >= HEADER_CACHE_SIZE:
        cache.clear()  # ever-new shapes: start over rather than grow
    cache[key] = value
