"""The ``.vqd`` file format: VQ-DRAW codes of one or more images, bit-packed.

A file is a 36-byte header followed by the payload. All integers are unsigned
little-endian.

====== ====== ============ =====================================================
offset bytes  field        meaning
====== ====== ============ =====================================================
0      4      magic        ``89 56 51 44`` (``\\x89VQD``); the high first byte
                           catches files mangled as text
4      1      version      format version, 1
5      1      flags        reserved, 0
6      8      fingerprint  first 8 bytes of SHA-256 over the model's architecture
                           config (JSON) and weights (``model_fingerprint``)
14     2      channels     image shape C, H, W (the model's)
16     2      height
18     2      width
20     2      options      K, choices per stage (2 to 65535)
22     2      stages       n, stages stored per image (1 to 65535)
24     4      count        N, images in the file (>= 1)
28     4      payload_crc  CRC-32 of the complete payload
32     4      header_crc   CRC-32 of bytes 0 to 31
36     ...    payload      the codes, ``ceil(N * n * b / 8)`` bytes
====== ====== ============ =====================================================

**Payload.** Each code is ``b = ceil(log2 K)`` bits (6 for K = 64), written most
significant bit first into a bit stream that fills bytes from their most
significant bit. The order is stage-major: stage 0 of images 0..N-1, then
stage 1 of all images, and so on. The last byte is zero-padded. An MNIST digit
(N = 1, n = 10, K = 64) has 60 bits of codes: an 8-byte payload, 44 bytes in all.

**Progressive files.** Because stages come in order, any prefix of a file is
itself decodable: a file cut to ``L >= 36`` bytes holds
``m = min(n, floor(8 * (L - 36) / (N * b)))`` complete stages, and decodes to
the reconstruction after stage m (the bits of a partial stage are ignored).
"Cut after stage m" means truncated to exactly ``36 + ceil(m * N * b / 8)``
bytes, which is the shortest file holding m stages. ``payload_crc`` can only
be checked on a complete file; a cut file is decoded unchecked and reported as
such. A file holding no complete stage is an error.

**Errors.** Everything that is not a valid file raises ``CodecError`` with a
one-line reason: foreign magic, another version, header checksum, impossible
header values, truncation, trailing bytes, payload checksum, code values >= K,
non-zero padding, and (``check_model``) a file written by another model.
Nothing is allocated beyond a small multiple of the file's size: the header is
checked against the size before the payload is read, the payload is read in
bounded chunks, and ``Reader.codes`` reads only the images asked for.
"""

import hashlib
import io
import json
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .files import atomic_write

MAGIC = b"\x89VQD"
VERSION = 1
SUFFIX = ".vqd"
_LAYOUT = struct.Struct("<4sBB8sHHHHHII")  # everything before the two checksums
HEADER_SIZE = _LAYOUT.size + 4  # + header_crc
FINGERPRINT_SIZE = 8
# Architecture settings hashed into the fingerprint; training-only settings (coefficients,
# checkpointing) do not change what a code decodes to.
_FINGERPRINT_KEYS = ("dataset", "options", "stages", "segment", "loss")


class CodecError(ValueError):
    """A .vqd file that cannot be decoded (corrupt, truncated, foreign, or for another model)."""


@dataclass(frozen=True)
class Header:
    """The fields of a .vqd header, plus how much of the payload a given file holds."""

    fingerprint: bytes
    shape: tuple
    options: int
    stages: int
    count: int
    payload_crc: int = 0
    version: int = VERSION

    @property
    def bits(self):
        """b, bits per code: ceil(log2 K)."""
        return bits_per_code(self.options)

    @property
    def payload_size(self):
        """Bytes of the complete payload."""
        return -(-self.count * self.stages * self.bits // 8)

    @property
    def file_size(self):
        return HEADER_SIZE + self.payload_size

    def stages_in(self, size):
        """Complete stages held by a file of ``size`` bytes (0 when not even one)."""
        return min(self.stages, 8 * max(0, size - HEADER_SIZE) // (self.count * self.bits))

    def cut_size(self, stages):
        """Bytes of this file cut after ``stages`` stages."""
        return HEADER_SIZE + -(-self.count * stages * self.bits // 8)


def bits_per_code(options):
    """ceil(log2 K): 6 for K = 64, 1 for K = 2."""
    return max(1, math.ceil(math.log2(options)))


def model_fingerprint(model):
    """8 bytes identifying a model's architecture and exact weights.

    SHA-256 over the architecture config as sorted JSON, then for every entry of
    ``state_dict()`` in order its name, dtype, shape and raw bytes. Cached on the
    model and recomputed when any weight changes (tensor version counters).
    """
    state = model.state_dict()
    key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    cached = getattr(model, "_vqd_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    config = getattr(model, "config", {}) or {}
    arch = {k: config.get(k) for k in _FINGERPRINT_KEYS}
    arch.update(shape=list(model.shape), options=model.options, stages=model.num_stages)
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    digest = h.digest()[:FINGERPRINT_SIZE]
    model._vqd_fingerprint = (key, digest)
    return digest


# ---------------------------------------------------------------------- bits


def pack_codes(codes, bits):
    """Codes [N x n] (stage-major order in the stream) -> bytes, ``bits`` per code, MSB first."""
    values = np.ascontiguousarray(np.asarray(codes, dtype=np.int64).T).reshape(-1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    stream = ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream).tobytes()


def codes_from_bits(data, skip, count, bits):
    """``count`` codes of ``bits`` bits each, starting ``skip`` bits into ``data``: int64 [count].

    The inverse of ``pack_codes`` for one run of the stream (MSB first).
    """
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=skip + count * bits)
    stream = stream[skip:].reshape(count, bits)
    values = np.zeros(count, dtype=np.int64)
    for j in range(bits):  # column by column: memory stays a small multiple of the bytes read
        values |= stream[:, j].astype(np.int64) << (bits - 1 - j)
    return values


# ---------------------------------------------------------------------- files


def pack(codes, fingerprint, shape, options):
    """Build a .vqd file.

    :param codes: integers [N x n] in [0, K): n stages of N images.
    :param fingerprint: 8 bytes (``model_fingerprint``).
    :param shape: image shape (C, H, W).
    :param options: K.
    :return: the file as bytes.
    """
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise CodecError(f"codes must be integers, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise CodecError(f"codes must have shape [images x stages] with both >= 1, "
                         f"got {list(codes.shape)}")
    count, stages = codes.shape
    if not 2 <= options <= 0xFFFF:
        raise CodecError(f"options must be between 2 and 65535, got {options}")
    if stages > 0xFFFF or count > 0xFFFFFFFF:
        raise CodecError(f"at most 65535 stages and 2**32 - 1 images fit a file, "
                         f"got {stages} and {count}")
    if len(shape) != 3 or not all(1 <= int(s) <= 0xFFFF for s in shape):
        raise CodecError(f"shape must be (C, H, W) with each in 1..65535, got {tuple(shape)}")
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise CodecError(f"fingerprint must be {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
    codes = codes.cpu().long()
    if codes.min() < 0 or codes.max() >= options:
        raise CodecError(f"codes must be in [0, {options}), got values from {int(codes.min())} "
                         f"to {int(codes.max())}")
    payload = pack_codes(codes.numpy(), bits_per_code(options))
    fields = _LAYOUT.pack(MAGIC, VERSION, 0, bytes(fingerprint), *map(int, shape), options,
                          stages, count, zlib.crc32(payload))
    return fields + struct.pack("<I", zlib.crc32(fields)) + payload


def read_header(data, name="file"):
    """Parse and validate the header at the start of ``data`` (bytes, at least the header).

    :return: a ``Header``. Raises ``CodecError``.
    """
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        what = "empty" if not data else f"starts with {bytes(data[:4])!r}"
        raise CodecError(f"{name} is not a VQ-DRAW .vqd file ({what}, expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        raise CodecError(f"{name} is truncated: {len(data)} bytes, shorter than the "
                         f"{HEADER_SIZE}-byte header")
    magic, version, flags, fingerprint, c, h, w, options, stages, count, payload_crc = \
        _LAYOUT.unpack_from(data)
    if version != VERSION:
        newer = "newer than this vq_draw reads; upgrade vq_draw" if version > VERSION else "unknown"
        raise CodecError(f"{name} has format version {version}, {newer} (this vq_draw reads "
                         f"version {VERSION})")
    (header_crc,) = struct.unpack_from("<I", data, _LAYOUT.size)
    if zlib.crc32(data[:_LAYOUT.size]) != header_crc:
        raise CodecError(f"{name} is corrupt: header checksum mismatch")
    if flags != 0:
        raise CodecError(f"{name} sets unknown flags {flags:#04x}; it was written by a newer or "
                         f"foreign encoder")
    for field, value, low in (("channels", c, 1), ("height", h, 1), ("width", w, 1),
                              ("options", options, 2), ("stages", stages, 1), ("count", count, 1)):
        if value < low:
            raise CodecError(f"{name} is corrupt: header field {field} = {value} (must be >= {low})")
    return Header(fingerprint=bytes(fingerprint), shape=(c, h, w), options=options, stages=stages,
                  count=count, payload_crc=payload_crc, version=version)


def unpack(data, name="file"):
    """Parse a whole .vqd file (or a cut prefix of one) held in memory.

    :param data: the file's bytes.
    :return: (header, codes) with codes an int64 tensor [N x m], m the complete stages
             present (``header.stages`` unless the file was cut). Raises ``CodecError``.
    """
    with Reader(io.BytesIO(data), name) as reader:
        reader.verify()
        return reader.header, reader.codes()


class Reader:
    """A .vqd file read piece by piece, so that memory never follows what a header claims.

    Opening reads only the header and compares it with the file's size: a header that
    claims more than the file holds, or a file longer than its header says, fails here,
    before any payload is read. ``verify`` then reads the payload once in bounded
    chunks (checksum, padding, code values), and ``codes`` reads only the bits of the
    images asked for. A cut file holds ``stages`` < ``header.stages`` complete stages.

    :param file: a seekable binary file object, positioned anywhere; closed by ``close``.
    :param name: how errors name the file.
    """

    # Codes checked per read in ``verify``: a multiple of 8, so that a chunk of
    # ``bits * CHUNK_CODES // 8`` bytes starts and ends on a code boundary.
    CHUNK_CODES = 1 << 19

    def __init__(self, file, name="file"):
        self.file, self.name = file, name
        try:
            self.size = file.seek(0, os.SEEK_END)
            file.seek(0)
            head = file.read(HEADER_SIZE)
        except OSError as exc:
            raise CodecError(f"cannot read {name}: {exc.strerror or exc}") from None
        self.header = header = read_header(head, name)
        if self.size > header.file_size:
            raise CodecError(f"{name} is corrupt: {self.size - header.file_size} bytes after the "
                             f"end of the payload ({header.file_size} bytes expected)")
        self.complete = self.size == header.file_size
        self.stages = header.stages if self.complete else header.stages_in(self.size)
        if self.stages < 1:
            raise CodecError(f"{name} is truncated: {self.size} bytes hold no complete stage (at "
                             f"least {header.cut_size(1)} of {header.file_size} bytes needed)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.file.close()

    def verify(self):
        """Check the payload: checksum and padding (complete files) and that every code of the
        complete stages is below K. Reads it once, ``bits * CHUNK_CODES / 8`` bytes at a time."""
        header, bits = self.header, self.header.bits
        codes_left = header.count * self.stages  # a cut file's partial stage is never decoded
        check_values = header.options < (1 << bits)
        # A complete file is read to its end for the checksum; a cut one only as far as its codes go.
        left = self.size - HEADER_SIZE if self.complete else -(-codes_left * bits // 8)
        crc, largest, chunk = 0, 0, b""
        self.file.seek(HEADER_SIZE)
        while left > 0:
            chunk = self._read(min(left, bits * self.CHUNK_CODES // 8))
            left -= len(chunk)
            crc = zlib.crc32(chunk, crc)
            if check_values and codes_left > 0:
                count = min(codes_left, 8 * len(chunk) // bits)
                largest = max(largest, int(codes_from_bits(chunk, 0, count, bits).max()))
                codes_left -= count
        if self.complete:
            if crc != header.payload_crc:
                raise CodecError(f"{self.name} is corrupt: payload checksum mismatch")
            used = header.count * header.stages * bits
            if used % 8 and chunk[-1] & ((1 << (8 - used % 8)) - 1):
                raise CodecError(f"{self.name} is corrupt: non-zero padding bits")
        if largest >= header.options:
            raise CodecError(f"{self.name} is corrupt: code value {largest} is not below the "
                             f"{header.options} options")

    def codes(self, start=0, stop=None, stages=None):
        """Codes of images ``start`` to ``stop - 1`` (default all) in their first ``stages``
        stages (default all the file holds): int64 tensor [stop - start x stages].

        Reads only those bits, one run per stage. Values are checked by ``verify``.
        """
        header, bits = self.header, self.header.bits
        stop = header.count if stop is None else stop
        stages = self.stages if stages is None else stages
        if not (0 <= start <= stop <= header.count and 0 <= stages <= self.stages):
            raise ValueError(f"images {start}:{stop} and {stages} stages asked of a file holding "
                             f"{header.count} images of {self.stages} stages")
        out = np.empty((stop - start, stages), dtype=np.int64)
        for stage in range(stages):
            first = (stage * header.count + start) * bits  # bit offsets into the payload
            end = (stage * header.count + stop) * bits
            self.file.seek(HEADER_SIZE + first // 8)
            data = self._read(-(-end // 8) - first // 8)
            out[:, stage] = codes_from_bits(data, first % 8, stop - start, bits)
        return torch.from_numpy(out)

    def _read(self, size):
        try:
            data = self.file.read(size)
        except OSError as exc:
            raise CodecError(f"cannot read {self.name}: {exc.strerror or exc}") from None
        if len(data) < size:  # the size was checked on opening: the file shrank since
            raise CodecError(f"{self.name} is truncated: it became shorter while being read")
        return data


def check_model(header, model, name="file"):
    """Raise ``CodecError`` unless ``model`` is the model that wrote ``header``."""
    if header.shape != tuple(model.shape) or header.options != model.options:
        raise CodecError(f"{name} holds {header.options}-option codes of "
                         f"{'x'.join(map(str, header.shape))} images; this model makes "
                         f"{model.options}-option codes of {'x'.join(map(str, model.shape))} images: "
                         f"decode with the checkpoint that encoded it")
    if header.stages > model.num_stages:
        raise CodecError(f"{name} holds {header.stages} stages; this model has {model.num_stages}")
    mine = model_fingerprint(model)
    if header.fingerprint != mine:
        raise CodecError(f"{name} was written by another model (fingerprint "
                         f"{header.fingerprint.hex()}, this model's is {mine.hex()}): decode with "
                         f"the checkpoint that encoded it")


# ---------------------------------------------------------------------- paths and models


def open_file(path):
    """Open a .vqd file as a ``Reader``: only its header is read, and checked against its size.

    Use it in a ``with`` block. Raises ``CodecError``.
    """
    name = os.fspath(path)
    try:
        # Non-blocking, so that a named pipe is refused instead of waiting for a writer.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CodecError(f"cannot read {name}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CodecError(f"cannot read {name}: it is not a regular file (a named pipe, a folder "
                         f"or a device); give a .vqd file")
    os.set_blocking(fd, True)
    file = os.fdopen(fd, "rb")
    try:
        return Reader(file, name)
    except BaseException:
        file.close()
        raise


def read_file(path):
    """Read and check a whole .vqd file; memory is bounded by the codes it really holds.

    :return: (header, codes [N x m], complete) where complete is False for a cut file.
    """
    with open_file(path) as reader:
        reader.verify()
        return reader.header, reader.codes(), reader.complete


def write_file(path, data):
    """Write bytes atomically (``files.atomic_write``): a failed write leaves ``path`` as it was."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as exc:
        raise CodecError(f"cannot write {path}: {exc.strerror or exc}") from None


def encode_file(model, codes):
    """Codes [N x n] produced by ``model`` -> .vqd bytes."""
    return pack(codes, model_fingerprint(model), model.shape, model.options)


def decode_file(model, data, num_stages=None, name="file"):
    """.vqd bytes -> normalized reconstructions [N x *shape] after ``num_stages`` stages.

    Decodes every stage the file holds by default; ``num_stages`` must not exceed that.
    """
    header, codes = unpack(data, name)
    check_model(header, model, name)
    return model.decode(codes, _check_stages(num_stages, codes.shape[1], header, name))


def _check_stages(num_stages, present, header, name):
    if num_stages is None:
        return present
    if not 1 <= num_stages <= present:
        cut = "" if present == header.stages else f" (cut from {header.stages})"
        raise CodecError(f"--stages {num_stages} asked, but {name} holds {present} "
                         f"stages{cut}; use 1 to {present}")
    return num_stages
