"""The ``vq-draw`` command line (also ``python -m vq_draw``).

    vq-draw encode IMAGE... -m CKPT -o OUT [--stages N] [--beam B] [--force]
    vq-draw decode FILE.vqd... -m CKPT -o OUT [--stages N] [--progressive] [--force]
    vq-draw info FILE.vqd... [-m CKPT]
    vq-draw rd -m CKPT [--data-dir DIR] [--limit N] [-o PREFIX] [--beam B,B,... [--beam-stages N,...]]
               [--force]

``encode`` writes one .vqd file per image into the folder OUT, or, when OUT ends
in ``.vqd``, one file holding all the images in the order given. ``decode``
writes OUT itself when OUT ends in ``.png`` and the files hold one image in all;
otherwise OUT is a folder receiving ``STEM.png`` for a one-image file and
``STEM-INDEX.png`` for each image of a batch file. ``rd`` charts rate against
distortion on a test set, beside JPEG and WebP. No command writes over a file that
exists unless given ``--force``, nor ever over one of its own inputs (both are checked
before any work). Every failure is one line ``error: ...`` on stderr and a non-zero
exit status.
"""

import os
import sys

import torch

from . import codec
from .arguments import Parser as _Parser
from .arguments import one_line as _one_line
from .arguments import positive_int as _positive
from .codec import CodecError


class CliError(RuntimeError):
    """A usage problem found after parsing (paths, counts)."""


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit("error: interrupted")
    except (CliError, CodecError, CheckpointError, DataError, ValueError, OSError) as exc:
        sys.exit(f"error: {_one_line(exc)}")
    except Exception as exc:  # anything unforeseen still ends in one line, not a traceback
        sys.exit(f"error: unexpected {type(exc).__name__}: {_one_line(exc)}")


def build_parser():
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = _Parser(prog="vq-draw", description="Compress images with a VQ-DRAW model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def force_arg(p):
        p.add_argument("--force", action="store_true",
                       help="replace output files that exist (never one of the command's inputs)")

    def model_args(p, required=True):
        p.add_argument("-m", "--model", required=required, metavar="CKPT",
                       help="model file (exported weights or a training checkpoint)")
        p.add_argument("--device", default=default_device)
        p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass")

    p = sub.add_parser("encode", help="images -> .vqd files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files Pillow can read")
    model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="folder for one FILE.vqd per image, or a single .vqd file for all")
    p.add_argument("--stages", type=_positive, default=None, help="stages to store (default all)")
    p.add_argument("--beam", type=_positive, default=1,
                   help="partial codes kept per stage (1 = greedy, as in the paper)")
    force_arg(p)
    p.set_defaults(run=run_encode)

    p = sub.add_parser("decode", help=".vqd files -> PNG images")
    p.add_argument("files", nargs="+", metavar="FILE.vqd")
    model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.png for a single image, else a folder")
    p.add_argument("--stages", type=_positive, default=None,
                   help="decode only the first N stages (default: all the file holds)")
    p.add_argument("--progressive", action="store_true",
                   help="write every stage's reconstruction side by side")
    force_arg(p)
    p.set_defaults(run=run_decode)

    p = sub.add_parser("info", help="print the header of .vqd files")
    p.add_argument("files", nargs="+", metavar="FILE.vqd")
    p.add_argument("-m", "--model", default=None, metavar="CKPT",
                   help="also check that the files belong to this model")
    p.set_defaults(run=run_info)

    p = sub.add_parser("rd", help="rate-distortion on a test set, against JPEG and WebP")
    model_args(p)
    p.set_defaults(batch_size=256)
    p.add_argument("--data-dir", default=None, help="as for training (torchvision root, folder, .npz)")
    p.add_argument("--download", action="store_true", help="download the test set if missing")
    p.add_argument("--limit", type=_positive, default=None, help="use the first N test images")
    p.add_argument("-o", "--output", default="rate_distortion", metavar="PREFIX",
                   help="writes PREFIX.csv and PREFIX.png")
    p.add_argument("--beam", type=_stage_list, default=[], metavar="B,B,...",
                   help="also encode with beam search of these widths")
    p.add_argument("--beam-stages", type=_stage_list, default=None, metavar="N,N,...",
                   help="stage counts to beam-encode (default all; each is a separate search)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    force_arg(p)
    p.set_defaults(run=run_rd)
    return parser


# ---------------------------------------------------------------------- encode


def run_encode(args):
    model = _load_model(args.model, args.device)
    stages = _stages(args.stages, model.num_stages, "--stages", "this model has")
    single = args.output.lower().endswith(codec.SUFFIX)
    if single:
        targets = [args.output]
    else:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CliError(f"-o {args.output} is a file; give a folder, or a name ending in "
                           f"{codec.SUFFIX} for one file holding all images")
        targets = _unique_names(args.images, args.output, codec.SUFFIX)
    _check_targets(targets, [*args.images, args.model], args.force)
    images = torch.stack([_read_image(path, model.shape) for path in args.images])
    codes = encode_images(model, images, stages, args.beam, args.batch_size)
    _make_parent(targets[0])
    groups = [codes] if single else codes.split(1)
    for target, group in zip(targets, groups):
        data = codec.encode_file(model, group)
        codec.write_file(target, data)
        print(f"wrote {target}: {len(group)} image{'s' * (len(group) > 1)}, {stages} stages, "
              f"{len(data)} bytes")


@torch.no_grad()
def encode_images(model, images, num_stages=None, beam=1, batch_size=64):
    """Images [N x *shape] in [0, 1] -> codes [N x n] (on the CPU), in batches."""
    device = next(model.parameters()).device
    step = max(1, batch_size // beam)  # a beam multiplies the work per image by B
    out = [model.encode(model.normalize(b.to(device)), num_stages, beam=beam).cpu()
           for b in images.split(step)]
    return torch.cat(out)


def _read_image(path, shape):
    from .data import DataError, load_image
    try:
        return load_image(path, shape)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises several types (decompression bombs, bad headers)
        raise CliError(f"cannot read image {path}: {_one_line(exc)}") from None


# ---------------------------------------------------------------------- decode


def run_decode(args):
    # Three passes, so that nothing is written unless every file is good and memory holds one
    # batch of codes at a time, whatever a header claims: the headers (checked against the
    # files' sizes, the model and the output), then each payload in chunks, then the images.
    model = _load_model(args.model, args.device)
    files = []  # (path, header, size, stages to decode)
    for path in args.files:
        with codec.open_file(path) as reader:
            header = reader.header
            codec.check_model(header, model, path)
            n = _stages(args.stages, reader.stages, "--stages", f"{path} holds")
            if not reader.complete:
                print(f"note: {path} was cut: it holds {reader.stages} of {header.stages} stages",
                      file=sys.stderr)
            files.append((path, header, reader.size, n))
    total = sum(header.count for _, header, _, _ in files)
    if args.output.lower().endswith(".png"):
        if total != 1:
            raise CliError(f"the files hold {total} images; give a folder as -o, not "
                           f"{args.output}")
        stems = [None]
    else:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CliError(f"-o {args.output} is a file; give a folder, or OUT.png for one image")
        stems = _unique_names([path for path, *_ in files], args.output, "")
    if stems == [None]:
        _check_targets([args.output], [*args.files, args.model], args.force)
    else:
        _check_folder_targets(args.output, [(stem, header.count) for (_, header, *_), stem
                                            in zip(files, stems)], [*args.files, args.model],
                              args.force)
    for path, *_ in files:
        with codec.open_file(path) as reader:
            reader.verify()
    for (path, header, size, n), stem in zip(files, stems):
        def target(index):
            return args.output if stem is None else _png_name(stem, index, header.count)
        _make_parent(target(0))
        with codec.open_file(path) as reader:
            if (reader.header, reader.size) != (header, size):
                raise CodecError(f"{path} changed while being decoded; run again")
            for start in range(0, header.count, args.batch_size):
                stop = min(start + args.batch_size, header.count)
                recons = decode_codes(model, reader.codes(start, stop, n), args.batch_size,
                                      args.progressive)
                for i, image in enumerate(recons, start):
                    save_png(image, target(i))
        last = header.count - 1
        print(f"wrote {target(0)}" + (f" ... {target(last)}" if last else "") + f" ({n} stages)")


def _png_name(stem, index, count):
    """STEM.png for the one image of a file, else STEM-INDEX.png with INDEX zero-padded."""
    return f"{stem}.png" if count == 1 else f"{stem}-{index:0{len(str(count - 1))}d}.png"


@torch.no_grad()
def decode_codes(model, codes, batch_size=64, progressive=False):
    """Codes [N x n] -> pixels in [0, 1] on the CPU: [N x *shape], or with ``progressive``
    [N x C x H x (n * W)] with the reconstruction after every stage from left to right."""
    device = next(model.parameters()).device
    out = []
    for chunk in codes.split(batch_size):
        recon = model.decode(chunk.to(device), return_all=progressive)
        pixels = model.denormalize(recon.flatten(0, 1) if progressive else recon).clamp(0, 1).cpu()
        if progressive:
            pixels = pixels.view(len(chunk), -1, *model.shape).permute(0, 2, 3, 1, 4).flatten(3)
        out.append(pixels)
    return torch.cat(out)


def to_uint8(pixels):
    """[C x H x W] in [0, 1] -> uint8 array [H x W] or [H x W x C], as saved to PNG."""
    array = (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[2] == 1 else array


def save_png(pixels, path):
    from PIL import Image
    try:
        Image.fromarray(to_uint8(pixels)).save(path, format="PNG")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- info


def run_info(args):
    model = _load_model(args.model, "cpu") if args.model else None
    for i, path in enumerate(args.files):
        # The header only, checked against the file's size: nothing of the payload is read.
        with codec.open_file(path) as reader:
            header, size, present, complete = reader.header, reader.size, reader.stages, \
                reader.complete
        if model is not None:
            codec.check_model(header, model, path)
        lines = [
            ("file", path),
            ("format version", header.version),
            ("model fingerprint", header.fingerprint.hex()
             + (f" (matches {args.model})" if model is not None else "")),
            ("image shape", "x".join(map(str, header.shape))),
            ("options", f"{header.options} ({header.bits} bits per code)"),
            ("stages", f"{header.stages}" if complete else
             f"{present} of {header.stages} (the file was cut after stage {present})"),
            ("images", header.count),
            ("bits per image", present * header.bits),
            ("payload", f"{size - codec.HEADER_SIZE} bytes"
             + ("" if complete else f" of {header.payload_size}")),
            ("file", f"{size} bytes ({codec.HEADER_SIZE}-byte header)"),
            ("payload checksum", f"{header.payload_crc:08x} (CRC-32; info does not read the "
             f"payload, decode checks it)"),
        ]
        if i:
            print()
        for key, value in lines:
            print(f"{key + ':':19s}{value}")


# ---------------------------------------------------------------------- rate-distortion


def run_rd(args):
    from .data import fixed_images, load_dataset
    from .rate_distortion import format_table, plot, rate_distortion, write_csv

    _check_targets([args.output + ".csv", args.output + ".png"], [args.model], args.force)
    model = _load_model(args.model, args.device)
    dataset = model.config.get("dataset")
    if dataset is None:
        raise CliError(f"{args.model} does not name its dataset; cannot pick a test set")
    data = load_dataset(dataset, "test", args.data_dir, download=args.download, shape=model.shape)
    images = fixed_images(data, args.limit or len(data))
    beam_stages = args.beam_stages
    if beam_stages is not None:
        for n in beam_stages:
            _stages(n, model.num_stages, "--beam-stages", "this model has")
    rows = rate_distortion(model, images, beams=args.beam, beam_stages=beam_stages,
                           batch_size=args.batch_size, progress=not args.quiet)
    _make_parent(args.output + ".csv")
    write_csv(rows, args.output + ".csv")
    plot(rows, args.output + ".png",
         title=args.title or f"{dataset}: {len(images)} test images, K = {model.options}")
    print(format_table(rows))
    print(f"wrote {args.output}.csv and {args.output}.png")


# ---------------------------------------------------------------------- helpers


def _load_model(path, device):
    from .loading import load_model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return load_model(path, map_location=device)


def _stages(value, limit, flag, what):
    if value is None:
        return limit
    if not 1 <= value <= limit:
        raise CliError(f"{flag} {value}: {what} {limit} stages; use 1 to {limit}")
    return value


def _unique_names(paths, folder, suffix):
    """folder/STEM + suffix for each path, refusing two inputs that would share a name."""
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "image"
        name = os.path.join(folder, stem + suffix)
        if name in seen:
            written = name if suffix else name + "*.png"
            raise CliError(f"{seen[name]} and {path} would both write {written}; rename one or "
                           f"run them separately")
        seen[name] = path
        names.append(name)
    return names


def _check_targets(targets, inputs, force):
    """Refuse, before any work, to write over one of the command's inputs (ever) or over a file
    that exists (unless ``force``)."""
    def same(a, b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # one does not exist (yet)
            return os.path.realpath(a) == os.path.realpath(b)

    for target in targets:
        for source in inputs:
            if same(target, source):
                raise CliError(f"the output {target} is also an input of this command ({source}); "
                               f"choose another -o")
        if os.path.lexists(target) and not force:
            raise CliError(f"{target} exists; choose another -o, or pass --force to replace it")


def _check_folder_targets(folder, stems, inputs, force):
    """``_check_targets`` for decode's STEM.png / STEM-INDEX.png names in ``folder``
    (``stems``: (folder/STEM, image count) pairs), from one listing of the folder: a header
    may claim 10^8 images, whose names are not made one by one."""
    if not os.path.isdir(folder):
        return  # nothing in it yet, and no input inside it
    wanted = {os.path.basename(stem): count for stem, count in stems}

    def written(name):
        """Whether decode writes folder/name."""
        stem, ext = os.path.splitext(name)
        if ext != ".png":
            return False
        if wanted.get(stem) == 1:
            return True
        stem, _, index = stem.rpartition("-")
        count = wanted.get(stem, 1)
        return count > 1 and index.isdigit() and len(index) == len(str(count - 1)) and \
            int(index) < count

    existing = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if written(name)]
    _check_targets(existing, inputs, force)


def _make_parent(path):
    parent = os.path.dirname(path)
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create folder {parent}: {exc.strerror or exc}") from None


def _stage_list(text):
    return [_positive(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()
