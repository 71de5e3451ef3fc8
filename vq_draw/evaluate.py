"""Held-out evaluation: distortion after every stage and code usage.

``python -m vq_draw.evaluate CHECKPOINT [--data-dir DIR] [--limit N] [--json OUT]`` prints a
table for the whole test set (or its first N >= 1 images; ``--limit 0`` is an error, not "all")
and writes JSON. Flags and the ``--json`` path are checked before the model is even loaded, so
that a mistake never costs an evaluation.
"""

import json
import math
import sys
import time

import torch

from .encoder import code_usage


def native_bf16(device="cpu"):
    """True where bfloat16 matrix products run in hardware, so that bf16 autocast speeds
    encoding up instead of emulating it: a CPU with AMX or AVX-512 BF16, a CUDA GPU that
    supports bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported",
                                                          "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


@torch.no_grad()
def evaluate(model, images, batch_size=500, device=None, progress=False, bf16=False):
    """Greedy-encode ``images`` and measure every stage.

    :param images: [N x *shape] in [0, 1] (a tensor), or a dataset yielding such images.
    :param bf16: encode under bfloat16 autocast: the network in bf16, the choices still on
                 float32 losses. Faster where ``native_bf16``; the codes differ from float32
                 encoding where two options score within bf16's precision of each other.
    :return: dict of lists of length S: "mse" (normalized space), "mse_pixels" ([0, 1]
             pixels, clamped as a saved image would be), "psnr" (dB, from the mean pixel MSE),
             "entropy" (nats), "options_used"; and "count", "final_mse", "codes" [N x S].
    """
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    n_stages = model.num_stages
    sq_norm = torch.zeros(n_stages, dtype=torch.float64)
    sq_pix = torch.zeros(n_stages, dtype=torch.float64)
    all_codes = []
    count = 0
    batches = _batches(images, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(images) / batch_size), desc="encoding",
                       file=sys.stderr)
    for batch in batches:
        batch = batch.to(device)
        x = model.normalize(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            codes, recons = model.encode(x, return_all=True)  # [B x S], [B x S x *shape]
        dims = tuple(range(2, recons.dim()))
        sq_norm += (recons - x.unsqueeze(1)).pow(2).mean(dims).sum(0).double().cpu()
        pixels = model.denormalize(recons.flatten(0, 1)).clamp(0, 1).view_as(recons)
        sq_pix += (pixels - batch.unsqueeze(1)).pow(2).mean(dims).sum(0).double().cpu()
        all_codes.append(codes.cpu())
        count += len(batch)
    model.train(was_training)
    codes = torch.cat(all_codes)
    return _result(count, (sq_norm / count).tolist(), (sq_pix / count).tolist(), codes, model.options)


def merge_results(parts, options):
    """One ``evaluate`` result from results on disjoint slices of a set (DDP evaluation).

    Per-stage MSEs are averaged weighted by image count; code usage is recomputed
    from all the codes. A single part is returned unchanged.
    """
    if len(parts) == 1:
        return parts[0]
    count = sum(p["count"] for p in parts)

    def mean(key):
        return [sum(p[key][s] * p["count"] for p in parts) / count for s in range(len(parts[0][key]))]

    codes = torch.cat([p["codes"] for p in parts])
    return _result(count, mean("mse"), mean("mse_pixels"), codes, options)


def _result(count, mse, mse_pixels, codes, options):
    """The result dict of ``evaluate`` from per-stage MSEs and all the codes [N x S]."""
    entropy, used = code_usage(codes, options)
    return {
        "count": count,
        "mse": mse,
        "mse_pixels": mse_pixels,
        "psnr": [10 * math.log10(1 / m) if m > 0 else float("inf") for m in mse_pixels],
        "entropy": entropy.tolist(),
        "options_used": used.tolist(),
        "final_mse": mse[-1],
        "codes": codes,
    }


def _batches(images, batch_size):
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    from .data import ArrayDataset
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)))
        if isinstance(images, ArrayDataset):
            yield images.batch(idx)
        else:
            yield torch.stack([images[int(i)] for i in idx])


def format_table(result, reference=None):
    """A text table of an ``evaluate`` result; ``reference`` adds a column of per-stage MSEs."""
    header = f"{'stage':>5} {'bits':>5} {'MSE':>9} {'MSE [0,1]':>10} {'PSNR dB':>8} " \
             f"{'entropy':>8} {'used':>5}"
    if reference:
        header += f" {'reference':>10}"
    lines = [header]
    bits = math.log2(result.get("options", 64))
    for s in range(len(result["mse"])):
        line = (f"{s + 1:>5} {bits * (s + 1):>5.0f} {result['mse'][s]:>9.5f} "
                f"{result['mse_pixels'][s]:>10.6f} {result['psnr'][s]:>8.2f} "
                f"{abs(result['entropy'][s]):>8.3f} {result['options_used'][s]:>5d}")  # no -0.000
        if reference and s < len(reference):
            line += f" {reference[s]:>10.4f}"
        lines.append(line)
    return "\n".join(lines)


# The original's released MNIST model on the full test set (ALGORITHM.md).
ORIGINAL_MNIST_MSE = [0.405, 0.280, 0.217, 0.170, 0.140, 0.122, 0.098, 0.089, 0.081, 0.0765]


def main(argv=None):
    from .arguments import Parser, check_output, device, fail, positive_int
    from .checkpoint import CheckpointError
    from .data import DataError, fixed_images, load_dataset
    from .loading import load_model

    parser = Parser(prog="python -m vq_draw.evaluate", description="Evaluate a VQ-DRAW checkpoint on a test set.")
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default=None, help="torchvision root, image folder or .npz")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N images (N >= 1; default: all of them)")
    parser.add_argument("--batch", type=positive_int, default=500)
    parser.add_argument("--device", type=device,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="encode under bfloat16 autocast (choices on float32 losses): faster on "
                             "CPUs with AMX or AVX-512 BF16 and on recent GPUs, slightly different codes")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    try:
        if args.json:  # checked first: the result would be lost after the whole evaluation
            check_output(args.json, "--json")
        model = load_model(args.checkpoint, map_location=args.device)
        data = load_dataset(model.config["dataset"], args.split, args.data_dir, shape=model.shape)
        if args.limit:
            data = fixed_images(data, args.limit)
        start = time.time()
        result = evaluate(model, data, args.batch, args.device, progress=True, bf16=args.bf16)
    except (CheckpointError, DataError, ValueError) as exc:
        fail(exc)
    result["options"] = model.options
    reference = ORIGINAL_MNIST_MSE if model.config["dataset"] == "mnist" and \
        model.num_stages == len(ORIGINAL_MNIST_MSE) else None
    seconds = time.time() - start
    if args.json:  # before printing, so a closed stdout (`| head`) does not lose the result
        from .files import atomic_write

        out = {k: v for k, v in result.items() if k != "codes"}
        out.update(checkpoint=args.checkpoint, config=model.config, split=args.split, bf16=args.bf16)
        try:
            atomic_write(args.json, lambda f: f.write(json.dumps(out, indent=2).encode()))
        except OSError as exc:
            print(json.dumps(out))  # the result, not lost, where the file could not hold it
            fail(f"cannot write --json {args.json}: {exc.strerror or exc}; the result is printed "
                 f"above instead")
    print(f"{args.checkpoint}: {result['count']} {args.split} images, "
          f"{seconds:.1f} s{', bf16 autocast' if args.bf16 else ''}")
    print(format_table(result, reference))


if __name__ == "__main__":
    main()
