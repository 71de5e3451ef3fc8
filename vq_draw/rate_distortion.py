"""Rate against distortion: VQ-DRAW files after each stage beside JPEG and WebP.

Distortion is measured as a user sees it: every decoder's output is rounded to
8-bit pixels (what ``vq-draw decode`` writes to PNG, what JPEG and WebP decode
to), then MSE is the mean over images of the per-image mean squared error in
[0, 1] pixels, and PSNR = 10 log10(1 / MSE) of that mean.

Rate for VQ-DRAW is the size of a one-image .vqd file (header + payload); the
payload alone (what each image adds to a batch file, to the byte) is reported
too. JPEG and WebP (Pillow, ``optimize=True`` / ``method=6``) are run at the
quality whose mean file size is closest to the VQ-DRAW file size, and at a sweep
of qualities for the plot.
"""

import csv
import io
import math
import sys

import numpy as np
import torch

from . import codec

FIELDS = ("method", "stages", "quality", "role", "bits_per_image", "payload_bytes",
          "bytes_per_image", "mse", "psnr")
QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100)}
SWEEP = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)  # plus each format's lowest quality


@torch.no_grad()
def rate_distortion(model, images, beams=(), beam_stages=None, batch_size=256, progress=False):
    """Measure everything over ``images``.

    :param images: [N x *shape] in [0, 1].
    :param beams: also encode with beams of these widths (> 1) at ``beam_stages`` (default all
                  stage counts; each is a separate search).
    :return: a list of row dicts with keys ``FIELDS``. Roles: "vq" (a VQ-DRAW code length),
             "matched" (JPEG/WebP at the quality closest in size to a VQ-DRAW row), "sweep".
    """
    device = next(model.parameters()).device
    count, stages, bits = len(images), model.num_stages, codec.bits_per_code(model.options)
    originals = _quantize(images)
    rows = []

    def vq_row(method, n, sq_err):
        payload = -(-n * bits // 8)
        mse = sq_err / count
        return dict(method=method, stages=n, quality="", role="vq", bits_per_image=n * bits,
                    payload_bytes=payload, bytes_per_image=codec.HEADER_SIZE + payload,
                    mse=mse, psnr=_psnr(mse))

    sq_err = torch.zeros(stages, dtype=torch.float64)
    for batch in _progress(images.split(batch_size), progress, "greedy"):
        _, recons = model.encode(model.normalize(batch.to(device)), return_all=True)
        sq_err += _sq_errors(model, recons.flatten(0, 1), batch.repeat_interleave(stages, 0)) \
            .view(-1, stages).sum(0)
    rows += [vq_row("vq-draw", n + 1, float(sq_err[n])) for n in range(stages)]

    for beam in [b for b in beams if b > 1]:
        for n in beam_stages or range(1, stages + 1):
            total = 0.0
            step = max(1, batch_size // beam)
            for batch in _progress(images.split(step), progress, f"beam {beam}, {n} stages"):
                codes = model.encode(model.normalize(batch.to(device)), n, beam=beam)
                total += float(_sq_errors(model, model.decode(codes), batch).sum())
            rows.append(vq_row(f"vq-draw beam {beam}", n, total))

    for fmt in ("jpeg", "webp"):
        cache = {}

        def point(q):
            if q not in cache:
                cache[q] = pillow_point(originals, fmt, q)
            return cache[q]

        for row in [r for r in rows if r["method"] == "vq-draw"]:
            q = closest_quality(lambda q: point(q)[0], row["bytes_per_image"], *QUALITY_RANGE[fmt])
            rows.append(_pillow_row(fmt, q, point(q), "matched", row["stages"]))
        for q in (QUALITY_RANGE[fmt][0], *SWEEP):
            rows.append(_pillow_row(fmt, q, point(q), "sweep", ""))
    return rows


def pillow_point(originals, fmt, quality):
    """Compress uint8 images [N x H x W (x C)] with Pillow: (mean bytes, MSE in [0, 1] pixels)."""
    from PIL import Image

    sizes, sq_err = 0, 0.0
    options = dict(optimize=True) if fmt == "jpeg" else dict(method=6)
    for array in originals:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt.upper(), quality=quality, **options)
        sizes += buffer.tell()
        buffer.seek(0)
        with Image.open(buffer) as out:
            decoded = np.asarray(out.convert("L" if array.ndim == 2 else "RGB"), dtype=np.float64)
        sq_err += np.mean((decoded - array) ** 2) / 255 ** 2
    return sizes / len(originals), sq_err / len(originals)


def closest_quality(size_of, target, lo, hi):
    """The quality in [lo, hi] whose size is closest to ``target`` (ties to the lower quality),
    by bisection: sizes grow with quality (nearly monotonically)."""
    a, b = lo, hi
    while a < b:  # smallest quality with size >= target (or hi)
        mid = (a + b) // 2
        if size_of(mid) >= target:
            b = mid
        else:
            a = mid + 1
    if a > lo and abs(size_of(a - 1) - target) <= abs(size_of(a) - target):
        return a - 1
    return a


def _pillow_row(fmt, quality, point, role, stages):
    size, mse = point
    return dict(method=fmt, stages=stages, quality=quality, role=role,
                bits_per_image=round(8 * size, 1), payload_bytes="", bytes_per_image=round(size, 1),
                mse=mse, psnr=_psnr(mse))


def _quantize(images):
    """[N x C x H x W] in [0, 1] -> uint8 arrays [N x H x W] (1 channel) or [N x H x W x C]."""
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arrays[..., 0] if arrays.shape[3] == 1 else arrays


def _sq_errors(model, recons, images):
    """Per-image MSE of 8-bit reconstructions against images in [0, 1]: [N] float64."""
    pixels = (model.denormalize(recons).clamp(0, 1) * 255).round().cpu().double() / 255
    return (pixels - images.double()).pow(2).flatten(1).mean(1)


def _psnr(mse):
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=5)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path):
    """The rows that ``write_csv`` wrote, typed again (floats to 6 significant digits), so that
    ``format_table(read_csv(path))`` reprints a saved run's tables."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("stages", "quality", "payload_bytes"):
            row[key] = int(row[key]) if row[key] else ""
        # VQ-DRAW sizes are whole bits and bytes; JPEG and WebP sizes are means over images.
        size = int if row["role"] == "vq" else float
        for key in ("bits_per_image", "bytes_per_image"):
            row[key] = size(row[key])
        for key in ("mse", "psnr"):
            row[key] = float(row[key])
    return rows


def format_table(rows):
    """Markdown: one line per VQ-DRAW code length with the matched JPEG and WebP; then, when
    beam search was measured, greedy against each beam width at equal bits."""
    vq = [r for r in rows if r["method"] == "vq-draw"]
    matched = {(r["method"], r["stages"]): r for r in rows if r["role"] == "matched"}
    head = "| stages | bits | bytes (file / payload) | MSE | PSNR dB |"
    rule = "| ---: | ---: | ---: | ---: | ---: |"
    for fmt in ("JPEG", "WebP"):
        head += f" {fmt} q | bytes | MSE | PSNR dB |"
        rule += " ---: | ---: | ---: | ---: |"
    lines = [head, rule]
    for r in vq:
        line = (f"| {r['stages']} | {r['bits_per_image']} | {r['bytes_per_image']} / "
                f"{r['payload_bytes']} | {r['mse']:.5f} | {r['psnr']:.2f} |")
        for fmt in ("jpeg", "webp"):
            m = matched[(fmt, r["stages"])]
            line += f" {m['quality']} | {m['bytes_per_image']:.1f} | {m['mse']:.5f} | {m['psnr']:.2f} |"
        lines.append(line)
    beams = {}
    for r in rows:
        if r["method"].startswith("vq-draw beam"):
            beams.setdefault(r["method"], {})[r["stages"]] = r
    if beams:
        lines += ["", "| stages | bits | greedy MSE | PSNR dB |"
                  + "".join(f" {name[8:]} MSE | PSNR dB | MSE change |" for name in beams),
                  "| ---: | ---: | ---: | ---: |" + " ---: | ---: | ---: |" * len(beams)]
        for r in vq:
            if not any(r["stages"] in b for b in beams.values()):
                continue
            line = f"| {r['stages']} | {r['bits_per_image']} | {r['mse']:.5f} | {r['psnr']:.2f} |"
            for b in beams.values():
                if r["stages"] in b:
                    m = b[r["stages"]]["mse"]
                    line += f" {m:.5f} | {b[r['stages']]['psnr']:.2f} | {100 * (m / r['mse'] - 1):+.1f} % |"
                else:
                    line += " | | |"
            lines.append(line)
    return "\n".join(lines)


def plot(rows, path, title=""):
    """PSNR against bytes per image (log scale) for every method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    vq = [r for r in rows if r["method"] == "vq-draw"]
    ax.plot([r["bytes_per_image"] for r in vq], [r["psnr"] for r in vq], "o-", color="C0",
            label="VQ-DRAW, one-image .vqd file")
    ax.plot([r["payload_bytes"] for r in vq], [r["psnr"] for r in vq], "o--", color="C0", alpha=0.5,
            label="VQ-DRAW, payload only (per image in a batch file)")
    names = sorted({r["method"] for r in rows if r["method"].startswith("vq-draw beam")},
                   key=lambda name: int(name.split()[-1]))
    for i, name in enumerate(names):
        beam = [r for r in rows if r["method"] == name]
        ax.plot([r["bytes_per_image"] for r in beam], [r["psnr"] for r in beam], "s:",
                color=f"C{3 + i}", label=f"VQ-DRAW, {name[8:]} search, one-image file")
    for fmt, color in (("jpeg", "C1"), ("webp", "C2")):
        sweep = sorted((r for r in rows if r["method"] == fmt and r["role"] == "sweep"),
                       key=lambda r: r["quality"])
        ax.plot([r["bytes_per_image"] for r in sweep], [r["psnr"] for r in sweep], ".-", color=color,
                label=f"{fmt.upper() if fmt == 'jpeg' else 'WebP'} (Pillow), quality "
                      f"{sweep[0]['quality']} to {sweep[-1]['quality']}")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image")
    ax.set_ylabel("PSNR (dB, 8-bit pixels)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
