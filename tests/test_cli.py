"""The ``vq-draw`` command line (vq_draw/cli.py): round trips through files, and bad input."""

import csv
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import vq_draw
from conftest import REPO, script_env, tiny_model, write_npz
from vq_draw import codec
from vq_draw.cli import main, to_uint8
from vq_draw.data import load_image
from vq_draw.rate_distortion import format_table, read_csv
from vq_draw.checkpoint import export_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny exported model, another one, and images of several formats and sizes."""
    root = tmp_path_factory.mktemp("cli")
    export_model(tiny_model("mnist", options=8, stages=3, seed=0), root / "model.pt")
    export_model(tiny_model("mnist", options=8, stages=3, seed=1), root / "other.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "c.webp")
    return root


def _model(files):
    return vq_draw.load_model(files / "model.pt")


def _images(files, *names):
    return torch.stack([load_image(files / n, (1, 28, 28)) for n in names])


def _png(path):
    return np.asarray(Image.open(path))


def test_one_file_per_image_round_trip(files, tmp_path):
    main(["encode", str(files / "a.png"), str(files / "b.jpg"), "-m", str(files / "model.pt"),
          "-o", str(tmp_path / "codes")])
    model = _model(files)
    for name in ("a", "b"):
        x = model.normalize(_images(files, f"{name}.{'png' if name == 'a' else 'jpg'}"))
        header, codes, complete = codec.read_file(tmp_path / "codes" / f"{name}.vqd")
        assert complete and header.count == 1 and os.path.getsize(tmp_path / "codes" / f"{name}.vqd") \
            == codec.HEADER_SIZE + 2  # 3 stages of 3 bits
        # Exactly the model's reconstruction, through the file.
        assert torch.equal(model.decode(codes), model.reconstruct(x))
        main(["decode", str(tmp_path / "codes" / f"{name}.vqd"), "-m", str(files / "model.pt"),
              "-o", str(tmp_path / f"{name}.png")])
        expected = to_uint8(model.denormalize(model.reconstruct(x))[0].clamp(0, 1))
        assert np.array_equal(_png(tmp_path / f"{name}.png"), expected)


def test_batch_file_prefixes_and_progressive(files, tmp_path, capsys):
    names = ("a.png", "b.jpg", "c.webp")
    out = tmp_path / "all.vqd"
    main(["encode", *(str(files / n) for n in names), "-m", str(files / "model.pt"), "-o", str(out),
          "--stages", "2"])
    model = _model(files)
    x = model.normalize(_images(files, *names))
    _, recons = model.encode(x, return_all=True)
    header, codes, _ = codec.read_file(out)
    assert header.count == 3 and header.stages == 2 and torch.equal(model.decode(codes), recons[:, 1])
    capsys.readouterr()
    main(["info", str(out), "-m", str(files / "model.pt")])
    info = capsys.readouterr().out
    assert "images:            3" in info and "stages:            2" in info and "matches" in info
    main(["decode", str(out), "-m", str(files / "model.pt"), "-o", str(tmp_path / "dec"),
          "--stages", "1"])
    for i in range(3):
        expected = to_uint8(model.denormalize(recons[i, 0]).clamp(0, 1))
        assert np.array_equal(_png(tmp_path / "dec" / f"all-{i}.png"), expected)
    main(["decode", str(out), "-m", str(files / "model.pt"), "-o", str(tmp_path / "prog"),
          "--progressive"])
    strip = _png(tmp_path / "prog" / "all-2.png")
    assert strip.shape == (28, 2 * 28)
    assert np.array_equal(strip[:, 28:], to_uint8(model.denormalize(recons[2, 1]).clamp(0, 1)))


def test_cut_file_decodes_to_its_last_whole_stage(files, tmp_path, capsys):
    main(["encode", str(files / "a.png"), str(files / "b.jpg"), "-m", str(files / "model.pt"),
          "-o", str(tmp_path / "two.vqd")])
    data = (tmp_path / "two.vqd").read_bytes()
    header = codec.read_header(data)
    (tmp_path / "cut.vqd").write_bytes(data[:header.cut_size(1)])
    capsys.readouterr()
    main(["decode", str(tmp_path / "cut.vqd"), "-m", str(files / "model.pt"), "-o", str(tmp_path / "d")])
    assert "holds 1 of 3 stages" in capsys.readouterr().err
    model = _model(files)
    _, recons = model.encode(model.normalize(_images(files, "a.png", "b.jpg")), return_all=True)
    assert np.array_equal(_png(tmp_path / "d" / "cut-0.png"),
                          to_uint8(model.denormalize(recons[0, 0]).clamp(0, 1)))


def test_beam_encoding(files, tmp_path):
    main(["encode", str(files / "a.png"), str(files / "c.webp"), "-m", str(files / "model.pt"),
          "-o", str(tmp_path / "beam.vqd"), "--beam", "4"])
    model = _model(files)
    x = model.normalize(_images(files, "a.png", "c.webp"))
    assert torch.equal(codec.read_file(tmp_path / "beam.vqd")[1], model.encode(x, beam=4))


def test_rate_distortion(files, tmp_path, capsys):
    write_npz(tmp_path / "test.npz", 12, (1, 28, 28))
    main(["rd", "-m", str(files / "model.pt"), "--data-dir", str(tmp_path / "test.npz"),
          "--limit", "5", "--beam", "2,3", "--beam-stages", "1,3", "-o", str(tmp_path / "rd"),
          "--quiet"])
    with open(tmp_path / "rd.csv") as f:
        rows = list(csv.DictReader(f))
    vq = [r for r in rows if r["method"] == "vq-draw"]
    assert [int(r["stages"]) for r in vq] == [1, 2, 3]
    assert [int(r["bytes_per_image"]) for r in vq] == [codec.HEADER_SIZE + 1] * 2 + [codec.HEADER_SIZE + 2]
    for b in (2, 3):
        assert [int(r["stages"]) for r in rows if r["method"] == f"vq-draw beam {b}"] == [1, 3]
    for fmt in ("jpeg", "webp"):
        assert len([r for r in rows if r["method"] == fmt and r["role"] == "matched"]) == 3
    for r in rows:
        assert float(r["mse"]) > 0 and float(r["psnr"]) == pytest.approx(-10 * np.log10(float(r["mse"])),
                                                                         rel=1e-4)
    assert os.path.getsize(tmp_path / "rd.png") > 1000
    out = capsys.readouterr().out
    assert "| stages |" in out and "beam 3 MSE" in out
    # The saved CSV reprints the same tables (what the README's tables are checked against).
    assert format_table(read_csv(tmp_path / "rd.csv")) in out


def test_usage_errors_are_one_line(files, tmp_path):
    model = str(files / "model.pt")
    cases = [
        ["encode", str(files / "a.png"), "-m", model, "-o", str(tmp_path / "x"), "--stages", "4"],
        ["encode", str(files / "a.png"), str(files / "a.png"), "-m", model, "-o", str(tmp_path / "x")],
        ["encode", str(files / "a.png"), "-m", model, "-o", str(tmp_path / "x"), "--beam", "0"],
        ["decode", str(tmp_path / "none.vqd"), "-m", model, "-o", str(tmp_path / "x.png")],
        ["rd", "-m", model, "--data-dir", str(tmp_path / "missing")],
        ["frobnicate"],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        message = str(info.value.code)
        assert message.startswith("error: ") and "\n" not in message, argv
    # Two images into one .png cannot be written.
    main(["encode", str(files / "a.png"), str(files / "b.jpg"), "-m", model, "-o", str(tmp_path / "t.vqd")])
    with pytest.raises(SystemExit, match="hold 2 images"):
        main(["decode", str(tmp_path / "t.vqd"), "-m", model, "-o", str(tmp_path / "t.png")])


# ---------------------------------------------------------------------- bad input, as a user sees it


def _bad_inputs(files, tmp):
    model = str(files / "model.pt")
    main(["encode", str(files / "a.png"), "-m", model, "-o", str(tmp / "good.vqd")])
    good = (tmp / "good.vqd").read_bytes()
    (tmp / "truncated.vqd").write_bytes(good[:30])
    (tmp / "foreign.vqd").write_bytes((files / "a.png").read_bytes())
    (tmp / "version.vqd").write_bytes(good[:4] + b"\x07" + good[5:])
    (tmp / "corrupt.vqd").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "foreign.pt")
    return {
        "truncated": (["decode", str(tmp / "truncated.vqd"), "-m", model, "-o", str(tmp / "o.png")],
                      "truncated"),
        "foreign file": (["info", str(tmp / "foreign.vqd")], "not a VQ-DRAW"),
        "wrong version": (["decode", str(tmp / "version.vqd"), "-m", model, "-o", str(tmp / "o.png")],
                          "version 7"),
        "corrupt": (["decode", str(tmp / "corrupt.vqd"), "-m", model, "-o", str(tmp / "o.png")],
                    "checksum"),
        "wrong model": (["decode", str(tmp / "good.vqd"), "-m", str(files / "other.pt"),
                         "-o", str(tmp / "o.png")], "another model"),
        "unreadable image": (["encode", str(tmp / "broken.png"), "-m", model, "-o", str(tmp / "o")],
                             "cannot read image"),
        "not a VQ-DRAW checkpoint": (["encode", str(files / "a.png"), "-m", str(tmp / "foreign.pt"),
                                      "-o", str(tmp / "o")], "not a VQ-DRAW checkpoint"),
        "image as checkpoint": (["decode", str(tmp / "good.vqd"), "-m", str(files / "a.png"),
                                 "-o", str(tmp / "o.png")], "cannot read checkpoint"),
    }


CASES = ["truncated", "foreign file", "wrong version", "corrupt", "wrong model", "unreadable image",
         "not a VQ-DRAW checkpoint", "image as checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(files, tmp_path, case, capsys):
    argv, expected = _bad_inputs(files, tmp_path)[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and expected in message
    assert capsys.readouterr().err == ""
    assert not os.path.exists(tmp_path / "o.png") and not os.path.exists(tmp_path / "o")


# A process each (~3 s of CPU to import torch): the cases the issue names.
@pytest.mark.parametrize("case", ["truncated", "foreign file", "wrong model", "unreadable image",
                                  "not a VQ-DRAW checkpoint"])
def test_bad_input_through_python_m_vq_draw(files, tmp_path, case):
    argv, expected = _bad_inputs(files, tmp_path)[case]
    result = subprocess.run([sys.executable, "-m", "vq_draw", *argv], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "o.png") and not os.path.exists(tmp_path / "o")


# A child process reports how far its peak memory (ru_maxrss, kB) rose while running each
# command, over what importing torch and vq_draw already took.
_PEAK_SCRIPT = """
import resource, sys
from vq_draw.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for argv in [line.split("\\t") for line in sys.argv[1].splitlines()]:
    try:
        main(argv)
        print("exit 0", flush=True)
    except SystemExit as exc:
        print("exit", exc.code, flush=True)
    print("rise_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, flush=True)
"""


def test_hostile_sparse_files_cost_little_memory(files, tmp_path):
    # Sparse files (4 kB on disk) whose headers claim 10**9 and 10**8 images of this model:
    # info reads only the header, and decode checks the payload in chunks before writing.
    # Before, info read and unpacked the whole size (3.5 GB for 10**8 MNIST images).
    model = _model(files)
    fingerprint = codec.model_fingerprint(model)

    def sparse(name, count):  # the payload checksum (0) is wrong, as an attacker's would be
        header = codec.Header(fingerprint=fingerprint, shape=model.shape, options=model.options,
                              stages=3, count=count)
        fields = struct.pack("<4sBB8sHHHHHII", codec.MAGIC, codec.VERSION, 0, fingerprint,
                             *model.shape, model.options, 3, count, 0)
        with open(tmp_path / name, "wb") as f:
            f.write(fields + struct.pack("<I", zlib.crc32(fields)))
            f.truncate(header.file_size)
        return str(tmp_path / name)

    billion, hundred_million = sparse("billion.vqd", 10 ** 9), sparse("1e8.vqd", 10 ** 8)
    commands = [
        ["info", billion],
        ["decode", hundred_million, "-m", str(files / "model.pt"), "-o", str(tmp_path / "one.png")],
        ["decode", hundred_million, "-m", str(files / "model.pt"), "-o", str(tmp_path / "out")],
    ]
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "\n".join(map("\t".join, commands))],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "images:            1000000000" in out and "info does not read the payload" in out
    exits = [line for line in out.splitlines() if line.startswith("exit")]
    assert exits[0] == "exit 0"
    assert "the files hold 100000000 images" in exits[1]
    assert "payload checksum mismatch" in exits[2]
    rises = [int(line.split()[1]) for line in out.splitlines() if line.startswith("rise_kb")]
    assert len(rises) == 3 and max(rises) < 64 * 1024, rises  # peak rose by under 64 MB
    assert not os.path.exists(tmp_path / "one.png") and not os.path.exists(tmp_path / "out")
