"""The benchmark's timings (vq_draw/tools/bench.py): the two implementations of one model,
a training step, greedy encoding and decoding, their FLOPs and the GEMM peak of the device.
"""

import copy
import time

import torch

from ..config import DATASETS, create_model, default_segment
from ..data import load_dataset
from ..loading import load_model, read_model_file
from ..nn import MaskedConv
from ..settings import ADAM_BETAS, ADAM_EPS
# The plain implementation (reference.py); "reference" below names the model copy it runs on.
from .. import reference as plain

ARCHITECTURES = ("mnist", "svhn", "cifar10", "celeba")

# Settings per architecture: (device kind, quick) -> stages, segment, train batch, coding batch.
# None means the published value. On the CPU the big models run one segment of a few stages
# (a 100-stage CIFAR step at batch 32 takes minutes here); the network per stage is unchanged.
SETTINGS = {
    "cpu": {
        "mnist": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "svhn": dict(stages=5, segment=5, train_batch=32, batch=200),
        "cifar10": dict(stages=4, segment=4, train_batch=32, batch=100),
        "celeba": dict(stages=4, segment=4, train_batch=32, batch=50),
    },
    "cuda": {
        "mnist": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "svhn": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "cifar10": dict(stages=None, segment=None, train_batch=32, batch=250),
        "celeba": dict(stages=None, segment=None, train_batch=32, batch=100),
    },
    "quick": {name: dict(stages=2, segment=1 if name != "mnist" else None, train_batch=2, batch=4)
              for name in ARCHITECTURES},
}
MEASURES = ("train", "train_ckpt", "encode", "decode")


# ---------------------------------------------------------------------- models and steps


def build_models(dataset, options=64, stages=None, segment=None, device="cpu", seed=0,
                 channels_last=True, which=("optimized", "reference"), checkpoint=None):
    """(optimized, reference): two copies of one freshly initialized model, same weights.

    With ``checkpoint`` (a path) both start from its trained weights instead; its
    architecture wins over ``options``, ``stages`` and ``segment``.

    The reference applies its masks unfolded and runs in the default NCHW layout; the
    optimized copy runs its activations in channels_last when ``channels_last``. A copy
    not named in ``which`` is None.
    """
    torch.manual_seed(seed)
    if checkpoint:
        model = load_model(checkpoint).train()
        if model.config.get("dataset") != dataset:
            raise ValueError(f"{checkpoint} is a {model.config.get('dataset')} model, not {dataset}")
    else:
        model = create_model(dataset, options=options, stages=stages, segment=segment)
    reference = None
    if "reference" in which:
        reference = model if "optimized" not in which else copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, MaskedConv):
                m.fold_mask = False
        reference.channels_last = False
        reference.to(device)
    if "optimized" not in which:
        return None, reference
    model.channels_last = channels_last
    return model.to(device), reference


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS)


def train_step(model, optimizer, x, reference=False, grad_checkpoint=False):
    """One training step (forward, backward, Adam); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    if reference:
        loss = plain.training_loss(model, x, grad_checkpoint)[0]
    else:
        model.grad_checkpoint = grad_checkpoint
        loss = model(x)["loss"]
    loss.backward()
    optimizer.step()
    return loss.detach()


def check_agreement(model, reference, x, codes=None):
    """Run both implementations once on the same inputs and compare them.

    Compares the training loss, the per-option losses, the gradients, the encoder's codes
    and reconstruction and the decoding of ``codes`` (default: the encoder's).
    :return: dict of max abs differences and ``codes_equal`` (bool).
    """
    model.train()
    reference.train()
    terms = model(x)
    model.zero_grad(set_to_none=True)
    terms["loss"].backward()
    loss, ref_codes, ref_losses = plain.training_loss(reference, x)
    reference.zero_grad(set_to_none=True)
    loss.backward()
    _, _, losses = model.run(x)
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters())
             if a is not None and b is not None]
    # Relative to the whole gradient: a per-parameter ratio blows up for parameters whose
    # exact gradient is zero (a bias right before a GroupNorm), where only rounding remains.
    grad_diff = (sum((a - b).pow(2).sum() for a, b in grads).sqrt()
                 / sum(b.pow(2).sum() for _, b in grads).sqrt().clamp_min(1e-30)).item()
    model.eval()
    reference.eval()
    enc_codes, enc_recons = model.encode(x, return_all=True)
    ref_enc_codes, ref_recon = plain.encode(reference, x)
    codes = enc_codes if codes is None else codes
    decoded = model.decode(codes)
    ref_decoded = plain.decode(reference, codes)
    model.train()
    reference.train()
    return {
        "codes_equal": bool(torch.equal(terms["codes"], ref_codes) and torch.equal(enc_codes, ref_enc_codes)),
        "loss": (terms["loss"] - loss).abs().item(),
        "losses": (losses - ref_losses).abs().max().item(),
        "grad_rel": grad_diff,
        "encode_recon": (enc_recons[:, -1] - ref_recon).abs().max().item(),
        "decode": (decoded - ref_decoded).abs().max().item(),
        "decode_is_reconstruct": bool(torch.equal(model.decode(enc_codes), enc_recons[:, -1])),
    }


# ---------------------------------------------------------------------- timing


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fns, repeats, device, clock="wall"):
    """The time of each function in each of ``repeats`` interleaved rounds (after one warm-up):
    a list of ``repeats`` seconds per function.

    :param clock: "wall", or "cpu" for this process's CPU time, which on a machine shared
                  with other jobs counts only the time the work itself ran (use it with one
                  thread: with more, threads waiting for each other count too).
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            start = now()
            fn()
            _sync(device)
            times[i].append(now() - start)
    return times


def count_gflop(fn):
    """GFLOP of the convolutions and matrix products that one call of ``fn`` runs, forward
    and backward (``torch.utils.flop_counter``; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def gemm_peak(device, repeats=3, clock="wall", size=2048):
    """GFLOP/s of a large float32 matrix product: what this device sustains at best."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    times = timed([lambda: torch.mm(a, b)], repeats, device, clock)[0]
    return 2 * size ** 3 / min(times) / 1e9


# Train + test images of each dataset, for "how long would encoding all of them take".
DATASET_IMAGES = {"mnist": 70000, "svhn": 99289, "cifar10": 60000, "celeba": 202599}


_TEST_SETS = {}


def _images(dataset, n, device, seed=1, data_dir=None):
    """n images [n x C x H x W] in [0, 1]: uniform noise, or the first n test images of
    ``data_dir`` (repeated when the test set is smaller)."""
    if data_dir:
        key = (dataset, data_dir)
        if key not in _TEST_SETS:
            _TEST_SETS[key] = load_dataset(dataset, "test", data_dir, download=False)
        images = _TEST_SETS[key]
        index = torch.arange(n) % len(images)
        if hasattr(images, "batch"):
            batch = images.batch(index)
        else:  # a dataset of image files: items are images or (image, label)
            items = [images[int(i)] for i in index]
            batch = torch.stack([item[0] if isinstance(item, (tuple, list)) else item
                                 for item in items])
        return batch.to(device)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DATASETS[dataset]["shape"], generator=gen).to(device)


def _codes(model, n, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.options, (n, model.num_stages), generator=gen).to(device)


def _run_measure(measure, model, reference, settings, device, impl_is_reference):
    """A callable running one measure with one implementation (for timing and memory)."""
    target = reference if impl_is_reference else model
    if measure in ("train", "train_ckpt"):
        x = target.normalize(_images(settings["dataset"], settings["train_batch"], device,
                                     data_dir=settings.get("data_dir")))
        optimizer = make_optimizer(target)
        target.train()
        ckpt = measure == "train_ckpt"
        return lambda: train_step(target, optimizer, x, impl_is_reference, ckpt), optimizer
    target.eval()
    if measure == "encode":
        x = target.normalize(_images(settings["dataset"], settings["batch"], device,
                                     data_dir=settings.get("data_dir")))
        if impl_is_reference:
            return lambda: plain.encode(target, x), None
        return lambda: target.encode(x), None
    codes = _codes(target, settings["batch"], device)
    if impl_is_reference:
        return lambda: plain.decode(target, codes), None
    return lambda: target.decode(codes), None


# ---------------------------------------------------------------------- memory


def settings_for(dataset, device, quick=False, stages=None, options=None, batch=None,
                 checkpoint=None, data_dir=None):
    kind = "quick" if quick else ("cuda" if torch.device(device).type == "cuda" else "cpu")
    s = dict(SETTINGS[kind][dataset], dataset=dataset, options=4 if quick else 64,
             checkpoint=checkpoint, data_dir=data_dir)
    if checkpoint:  # its architecture wins, as in build_models
        config = read_model_file(checkpoint)["config"]
        s.update(stages=config["stages"], segment=config.get("segment"), options=config["options"])
    else:
        if stages is not None:
            s["stages"], s["segment"] = stages, default_segment(dataset, stages)
        if options is not None:
            s["options"] = options
    if batch is not None:
        s["batch"] = batch
    s["stages_run"] = s["stages"] or DATASETS[dataset]["stages"]
    return s
