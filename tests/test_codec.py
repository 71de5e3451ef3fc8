"""The .vqd file format (vq_draw/codec.py) and beam-search encoding, on tiny models."""

import io
import itertools
import math
import os
import re
import struct
import time
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vq_draw
from conftest import random_images, tiny_model
from vq_draw import codec
from vq_draw.codec import HEADER_SIZE, CodecError
from vq_draw.checkpoint import export_model


def forge(fingerprint=b"\0" * 8, shape=(1, 28, 28), options=4, stages=3, count=1, payload=b"",
          version=codec.VERSION, flags=0, magic=codec.MAGIC, payload_crc=None):
    """A file with arbitrary header fields and valid checksums (to get past the CRC check)."""
    crc = zlib.crc32(payload) if payload_crc is None else payload_crc
    fields = struct.pack("<4sBB8sHHHHHII", magic, version, flags, fingerprint, *shape, options,
                         stages, count, crc)
    return fields + struct.pack("<I", zlib.crc32(fields)) + payload


# ---------------------------------------------------------------------- layout


def test_header_layout_and_mnist_payload_is_8_bytes():
    model = vq_draw.create_model("mnist")  # the published 10 stages of K = 64
    codes = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    data = codec.encode_file(model, codes)
    assert HEADER_SIZE == 36
    assert len(data) == HEADER_SIZE + 8  # 60 bits, padded to 8 bytes
    assert data[:4] == b"\x89VQD" and data[4] == codec.VERSION and data[5] == 0
    assert data[6:14] == codec.model_fingerprint(model)
    assert struct.unpack_from("<HHHHHI", data, 14) == (1, 28, 28, 64, 10, 1)
    assert struct.unpack_from("<I", data, 28)[0] == zlib.crc32(data[HEADER_SIZE:])
    assert struct.unpack_from("<I", data, 32)[0] == zlib.crc32(data[:32])


def test_bits_are_stage_major_msb_first():
    # K = 4 -> 2 bits. Stage 0 of images 0, 1 is (1, 3); stage 1 is (2, 0):
    # stream 01 11 10 00 -> 0x78.
    assert codec.pack_codes([[1, 2], [3, 0]], 2) == b"\x78"
    # K = 5 -> 3 bits; 9 bits pad to two bytes: 100 011 111 (+ 0000000).
    assert codec.pack_codes([[4, 3, 7]], 3) == bytes([0b10001111, 0b10000000])
    assert codec.bits_per_code(2) == 1 and codec.bits_per_code(64) == 6
    assert codec.bits_per_code(65) == 7 and codec.bits_per_code(65535) == 16


@pytest.mark.parametrize("options", [2, 3, 4, 5, 64, 100, 256, 1000, 65535])
@pytest.mark.parametrize("count, stages", [(1, 1), (1, 10), (3, 7), (17, 5)])
def test_pack_unpack_round_trip(options, count, stages):
    g = torch.Generator().manual_seed(options * 1000 + count * 10 + stages)
    codes = torch.randint(0, options, (count, stages), generator=g)
    codes[0, 0] = options - 1  # the largest value
    data = codec.pack(codes, b"12345678", (3, 32, 32), options)
    bits = codec.bits_per_code(options)
    assert len(data) == HEADER_SIZE + math.ceil(count * stages * bits / 8)
    header, out = codec.unpack(data)
    assert torch.equal(out, codes)
    assert (header.shape, header.options, header.stages, header.count) == \
        ((3, 32, 32), options, stages, count)


def test_pack_rejects_bad_codes():
    for codes, options in ((torch.tensor([[4]]), 4), (torch.tensor([[-1]]), 4),
                           (torch.zeros(1, 0, dtype=torch.long), 4), (torch.zeros(3), 4),
                           (torch.zeros(1, 2), 4), (torch.zeros(1, 2, dtype=torch.long), 1)):
        with pytest.raises(CodecError):
            codec.pack(codes, b"12345678", (1, 28, 28), options)


# ---------------------------------------------------------------------- round trip through files


@pytest.mark.parametrize("dataset", ["mnist", "svhn"])
def test_decoding_a_file_equals_the_reconstruction_exactly(tmp_path, dataset):
    model = tiny_model(dataset).eval()
    x = random_images(model, 3)
    codes = model.encode(x)
    path = tmp_path / "batch.vqd"
    codec.write_file(path, codec.encode_file(model, codes))
    header, read, complete = codec.read_file(path)
    assert complete and torch.equal(read, codes)
    codec.check_model(header, model)
    assert torch.equal(model.decode(read), model.reconstruct(x))
    # One file per image decodes to that image's reconstruction on its own.
    for i in range(len(x)):
        single = tmp_path / f"{i}.vqd"
        codec.write_file(single, codec.encode_file(model, model.encode(x[i:i + 1])))
        assert torch.equal(codec.decode_file(model, single.read_bytes()),
                           model.reconstruct(x[i:i + 1]))


def test_a_file_cut_after_any_stage_decodes_to_that_stage():
    model = tiny_model("mnist", stages=5, options=8).eval()  # 3 bits: stages straddle bytes
    x = random_images(model, 3)
    codes, recons = model.encode(x, return_all=True)
    data = codec.encode_file(model, codes)
    header = codec.read_header(data)
    for m in range(1, model.num_stages + 1):
        cut = data[:header.cut_size(m)]
        assert len(cut) == HEADER_SIZE + math.ceil(3 * m * 3 / 8)
        _, read = codec.unpack(cut)
        assert torch.equal(read, codes[:, :m])
        assert torch.equal(codec.decode_file(model, cut), recons[:, m - 1])
        # Any length up to the next stage's end holds exactly m stages.
        end = header.cut_size(m + 1) if m < model.num_stages else len(data) + 1
        for size in range(header.cut_size(m), end):
            assert codec.unpack(data[:size])[1].shape[1] == m
    for size in range(header.cut_size(1)):
        with pytest.raises(CodecError):
            codec.unpack(data[:size])
    with pytest.raises(CodecError, match="holds 2 stages"):
        codec.decode_file(model, data[:header.cut_size(2)], num_stages=3)


def test_encoding_fewer_stages_is_a_prefix():
    model = tiny_model("mnist").eval()
    x = random_images(model, 2)
    full = model.encode(x)
    header, read = codec.unpack(codec.encode_file(model, model.encode(x, num_stages=2)))
    assert header.stages == 2 and torch.equal(read, full[:, :2])


# ---------------------------------------------------------------------- fingerprint


def test_fingerprint_identifies_weights_and_survives_saving(tmp_path):
    a, b = tiny_model("mnist", seed=0), tiny_model("mnist", seed=1)
    fa = codec.model_fingerprint(a)
    assert len(fa) == 8 and fa != codec.model_fingerprint(b)
    export_model(a, tmp_path / "a.pt")
    assert codec.model_fingerprint(vq_draw.load_model(tmp_path / "a.pt")) == fa
    # A training-only setting does not change what a code decodes to.
    c = tiny_model("mnist", seed=0, aux_coeff=0.5)
    assert codec.model_fingerprint(c) == fa
    # An in-place change of one weight invalidates the cached value.
    with torch.no_grad():
        a.output_scale.add_(1e-3)
    assert codec.model_fingerprint(a) != fa


def test_file_from_another_model_is_refused():
    a, b = tiny_model("mnist", seed=0).eval(), tiny_model("mnist", seed=1).eval()
    data = codec.encode_file(a, a.encode(random_images(a, 1)))
    with pytest.raises(CodecError, match="another model"):
        codec.decode_file(b, data)
    other_shape = tiny_model("svhn").eval()
    with pytest.raises(CodecError, match="decode with the checkpoint"):
        codec.decode_file(other_shape, data)


# ---------------------------------------------------------------------- errors


def _valid():
    model = tiny_model("mnist", options=5).eval()  # K = 5: 3-bit codes, values 5..7 invalid
    return model, codec.encode_file(model, torch.tensor([[4, 0, 3], [1, 2, 4]]))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"", "not a VQ-DRAW"),
    (lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "not a VQ-DRAW"),
    (lambda d: d[:20], "truncated"),
    (lambda d: d[:4] + bytes([2]) + d[5:], "version 2, newer"),
    (lambda d: d[:4] + bytes([0]) + d[5:], "version 0"),
    (lambda d: d[:15] + bytes([d[15] ^ 1]) + d[16:], "header checksum"),
    (lambda d: d + b"\0", "after the end"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "payload checksum"),
    (lambda d: forge(flags=1, payload=d[36:]), "flags"),
    (lambda d: forge(count=0), "count = 0"),
    (lambda d: forge(options=1), "options = 1"),
    (lambda d: forge(stages=0), "stages = 0"),
    (lambda d: forge(shape=(0, 28, 28)), "channels = 0"),
    (lambda d: forge(options=5, stages=1, count=1, payload=b"\xe0"), "code value 7"),
    (lambda d: forge(options=4, stages=1, count=1, payload=b"\x41"), "padding"),
    (lambda d: forge(options=65535, stages=65535, count=2 ** 32 - 1, payload=b"\0" * 1000),
     "no complete stage"),
])
def test_bad_files_raise_one_clear_error(mutate, message):
    _, data = _valid()
    with pytest.raises(CodecError, match=message) as info:
        codec.unpack(mutate(data))
    assert "\n" not in str(info.value)


def test_absurd_header_never_allocates_much(tmp_path):
    # 2**32 images of 65535 stages would be ~ 10**15 bytes; a 1 kB file must fail cheaply.
    path = tmp_path / "absurd.vqd"
    path.write_bytes(forge(options=65535, stages=65535, count=2 ** 32 - 1, payload=b"\0" * 1000))
    tracemalloc.start()
    with pytest.raises(CodecError, match="truncated"):
        codec.read_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 ** 20
    # A header that claims a small payload is read only that far (+1 byte), however big the file.
    _, data = _valid()
    path.write_bytes(data + b"\0" * 5_000_000)
    tracemalloc.start()
    with pytest.raises(CodecError, match="after the end"):
        codec.read_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 ** 20


def sparse(path, size, payload_crc=0, **fields):
    """A forged header at the start of a sparse file of ``size`` bytes (the rest reads as zeros)."""
    with open(path, "wb") as f:
        f.write(forge(payload_crc=payload_crc, **fields))
        f.truncate(size)
    return path


def _peak_bytes(function):
    """Run ``function``; return (its result or the CodecError it raised, peak bytes allocated)."""
    tracemalloc.start()
    try:
        result = function()
    except CodecError as exc:
        result = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak


def test_sparse_file_claiming_a_billion_images_is_checked_in_bounded_memory(tmp_path):
    # A 4 kB file (on disk and in size) whose header claims 10**9 images of 3 stages: found
    # to be short from the header and the size alone.
    billion = dict(options=8, stages=3, count=10 ** 9)  # 3 bits per code
    full = HEADER_SIZE + 10 ** 9 * 9 // 8
    small = sparse(tmp_path / "small.vqd", 4096, **billion)
    error, peak = _peak_bytes(lambda: codec.open_file(small))
    assert isinstance(error, CodecError) and "4096 bytes hold no complete stage" in str(error)
    assert peak < 2 ** 16
    # As long as the header says (1.1 GB, sparse: 4 kB on disk): opening reads only the header.
    big = sparse(tmp_path / "big.vqd", full, **billion)
    with codec.open_file(big) as reader:
        assert (reader.size, reader.stages, reader.complete) == (full, 3, True)
    # One byte more than the header says is found without reading the payload.
    longer = sparse(tmp_path / "longer.vqd", full + 1, **billion)
    error, peak = _peak_bytes(lambda: codec.open_file(longer))
    assert "1 bytes after the end" in str(error) and peak < 2 ** 16
    # Verifying streams the payload: 10**8 images (112 MB) in a few MB, and the wrong
    # checksum is found at the end.
    hundred_million = sparse(tmp_path / "1e8.vqd", HEADER_SIZE + 10 ** 8 * 9 // 8,
                             options=8, stages=3, count=10 ** 8)
    with codec.open_file(hundred_million) as reader:
        error, peak = _peak_bytes(reader.verify)
    assert "payload checksum mismatch" in str(error) and peak < 2 ** 22
    error, peak = _peak_bytes(lambda: codec.read_file(hundred_million))
    assert "payload checksum mismatch" in str(error) and peak < 2 ** 22


def test_reader_reads_only_the_images_asked_for(tmp_path):
    # A valid sparse file of 10**8 images whose codes are all 0 (its checksum computed in
    # chunks): the last five images cost a few bytes, not the file.
    count, payload = 10 ** 8, 10 ** 8 * 9 // 8
    crc = 0
    for done in range(0, payload, 1 << 24):
        crc = zlib.crc32(bytes(min(1 << 24, payload - done)), crc)
    path = sparse(tmp_path / "zeros.vqd", HEADER_SIZE + payload, payload_crc=crc, options=8,
                  stages=3, count=count)
    with codec.open_file(path) as reader:
        error, peak = _peak_bytes(reader.verify)
        assert error is None and peak < 2 ** 22
        codes, peak = _peak_bytes(lambda: reader.codes(count - 5, count, stages=2))
    assert torch.equal(codes, torch.zeros(5, 2, dtype=torch.long)) and peak < 2 ** 16


def test_reader_slices_equal_the_whole_file():
    # 3-bit codes, so slices start and end inside bytes; a cut file too.
    codes = torch.randint(0, 5, (37, 4), generator=torch.Generator().manual_seed(0))
    data = codec.pack(codes, b"\0" * 8, (1, 28, 28), 5)
    header = codec.read_header(data)
    for cut, stages in ((data, 4), (data[:header.cut_size(3) + 1], 3)):
        with codec.Reader(io.BytesIO(cut)) as reader:
            reader.verify()
            assert (reader.stages, reader.complete) == (stages, stages == 4)
            assert torch.equal(reader.codes(), codes[:, :stages])
            for start, stop, n in ((0, 1, 1), (5, 6, stages), (3, 29, 2), (36, 37, stages), (7, 7, 1)):
                assert torch.equal(reader.codes(start, stop, n), codes[start:stop, :n])
            with pytest.raises(ValueError):
                reader.codes(0, 38)


def test_unreadable_path_is_a_codec_error(tmp_path):
    with pytest.raises(CodecError, match="cannot read"):
        codec.read_file(tmp_path / "missing.vqd")
    with pytest.raises(CodecError, match="cannot read"):
        codec.read_file(tmp_path)  # a folder


def _check_outcome(data, model):
    """Unpack arbitrary bytes: a CodecError, or a result that is fully valid (and decodable).

    :return: what happened, for hypothesis' statistics (numbers replaced by N).
    """
    try:
        header, codes = codec.unpack(data)
    except CodecError as exc:
        assert "\n" not in str(exc)
        return "CodecError: " + re.sub(r"0x[0-9a-f]+|\d+", "N", str(exc).split(": ", 1)[-1].split(" (")[0])
    m = codes.shape[1]
    assert codes.dtype == torch.long and codes.shape[0] == header.count
    assert 1 <= m <= header.stages
    # Everything allocated is bounded by the file: count * m codes of b bits fit its payload.
    assert header.count * m * header.bits <= 8 * (len(data) - HEADER_SIZE)
    assert int(codes.min()) >= 0 and int(codes.max()) < header.options
    try:
        codec.check_model(header, model)
    except CodecError:
        return "valid file, for another model"
    recon = model.decode(codes)
    assert recon.shape == (header.count, *model.shape) and torch.isfinite(recon).all()
    return "valid file, decoded" + (" (cut)" if m < header.stages else "")


# Scale with VQ_DRAW_FUZZ_EXAMPLES for a longer campaign; the default runs in ~20 s.
FUZZ_EXAMPLES = int(os.environ.get("VQ_DRAW_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=1000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
_MODEL = tiny_model("mnist", options=5, stages=4).eval()
_SEEDS = [codec.encode_file(_MODEL, c) for c in (
    torch.tensor([[4, 0, 3, 1]]), torch.tensor([[1, 2, 4, 0], [3, 3, 0, 2], [0, 1, 2, 3]]))]


@st.composite
def mutated_files(draw):
    """A valid file after 1 to 4 random mutations. Positions come from a seeded
    ``random.Random`` (uniform over the file; hypothesis' own integers favour 0)."""
    rnd = draw(st.randoms(use_true_random=False))
    data = bytearray(rnd.choice(_SEEDS))
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.choice(["flip", "byte", "cut", "insert", "delete", "field"])
        if kind == "flip" and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif kind == "byte" and data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif kind == "cut":
            del data[rnd.randint(0, len(data)):]
        elif kind == "insert":
            i = rnd.randint(0, len(data))
            data[i:i] = rnd.randbytes(rnd.randint(1, 8))
        elif kind == "delete" and data:
            i = rnd.randrange(len(data))
            del data[i:i + rnd.randint(1, 4)]
        elif kind == "field" and len(data) >= HEADER_SIZE:
            # Rewrite one header field and fix the checksums, to reach the checks behind them.
            offset, fmt = rnd.choice([(14, "H"), (16, "H"), (18, "H"), (20, "H"), (22, "H"),
                                      (24, "I"), (5, "B"), (6, "Q")])
            bits = struct.calcsize(fmt) * 8
            value = rnd.randint(0, 8) if rnd.random() < 0.5 else rnd.getrandbits(bits)
            struct.pack_into("<" + fmt, data, offset, value)
            struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[HEADER_SIZE:])))
            struct.pack_into("<I", data, 32, zlib.crc32(bytes(data[:32])))
    return bytes(data)


@FUZZ
@given(mutated_files())
def test_fuzz_mutated_files(data):
    event(_check_outcome(data, _MODEL))


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=200).map(lambda b: codec.MAGIC + b),
                 st.tuples(st.integers(1, 4), st.integers(1, 64), st.integers(1, 64),
                           st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2 ** 32 - 1),
                           st.binary(max_size=300)).map(
                     lambda t: forge(fingerprint=codec.model_fingerprint(_MODEL), shape=t[:3],
                                     options=t[3], stages=t[4], count=t[5], payload=t[6]))))
def test_fuzz_random_files(data):
    event(_check_outcome(data, _MODEL))


def test_every_bit_flip_and_cut_of_a_file():
    """Exhaustive: each single-bit flip and each truncation of two small files."""
    start = time.time()
    for seed in _SEEDS:
        for i in range(len(seed) * 8):
            flipped = bytearray(seed)
            flipped[i // 8] ^= 1 << (i % 8)
            with pytest.raises(CodecError):  # the checksums catch every single-bit error
                codec.unpack(bytes(flipped))
        for size in range(len(seed) + 1):
            _check_outcome(seed[:size], _MODEL)
    assert time.time() - start < 30


# ---------------------------------------------------------------------- beam search


def test_beam_of_one_is_greedy():
    model = tiny_model("mnist", output_scale=2.0).eval()
    x = random_images(model, 6)
    assert torch.equal(model._encode_beam(x, model.num_stages, 1), model.encode(x))
    assert torch.equal(model.encode(x, beam=1), model.encode(x))


def test_full_beam_finds_the_best_code():
    """A beam of K**S is exhaustive: it must find the lowest-loss code of all K**S."""
    # K = 4, S = 3: 64 codes; a large output scale makes the greedy choice often suboptimal.
    model = tiny_model("mnist", output_scale=10.0).eval()
    x = random_images(model, 6)
    k, s = model.options, model.num_stages
    every = torch.tensor(list(itertools.product(range(k), repeat=s)))
    every_loss = torch.stack([(model.decode(every) - xi).pow(2).flatten(1).mean(1) for xi in x])
    best = model.encode(x, beam=k ** s)
    best_loss = (model.decode(best) - x).pow(2).flatten(1).mean(1)
    greedy_loss = (model.reconstruct(x) - x).pow(2).flatten(1).mean(1)
    assert torch.allclose(best_loss, every_loss.min(1).values, rtol=0, atol=1e-6)
    assert (best_loss <= greedy_loss + 1e-6).all()
    assert (greedy_loss > best_loss + 1e-6).any(), "greedy is optimal here: the test proves nothing"


def test_beam_reconstruction_is_the_decoded_code():
    model = tiny_model("svhn").eval()  # segments: the beam crosses refiner boundaries
    x = random_images(model, 3)
    codes, recons = model.encode(x, beam=3, return_all=True)
    assert codes.shape == (3, model.num_stages) and recons.shape[1] == model.num_stages
    assert torch.equal(recons, model.decode(codes, return_all=True))
    assert torch.equal(model.reconstruct(x, beam=3), model.decode(codes))
    data = codec.encode_file(model, model.encode(x, num_stages=2, beam=3))
    assert codec.decode_file(model, data).shape == x.shape


@pytest.mark.parametrize("beam", [0, -1, 1.5, True, "2"])
def test_bad_beam_is_refused(beam):
    model = tiny_model("mnist").eval()
    with pytest.raises(ValueError, match="beam"):
        model.encode(random_images(model, 1), beam=beam)
