"""The training loop: accumulation, checkpoints with exact resume, evaluation, logging, DDP.

A *step* is one micro-batch (forward and backward), as in the original's flags;
the optimizer updates once every ``step_interval`` steps with the loss averaged
over those micro-batches. ``step_limit``, ``save_interval``, ``eval_interval``
and the learning-rate schedule all count steps, so the published commands mean
what they meant in the original.

Under ``torchrun`` every process runs a micro-batch of ``batch_size`` per step;
one update then averages ``batch_size * step_interval * world_size`` images.
"""

import csv
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .config import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, config_mismatch,
                     model_from_checkpoint, read_checkpoint)
from .data import BatchSampler, fixed_images, iterate_batches
from .evaluate import evaluate, format_table


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is left intact."""


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then rename.

    A crash or a full disk in the middle leaves the previous checkpoint untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise SaveError(f"could not write checkpoint {path}: {exc.strerror or exc}; the previous "
                        f"checkpoint is intact") from None


def export_model(model, path):
    """Save weights and config only (no optimizer state): a small file for ``load_model``."""
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                           "config": dict(model.config), "model": model.state_dict()})


def learning_rate(step, lr, lr_final, step_limit):
    """Linear from ``lr`` at step 0 to ``lr_final`` at ``step_limit`` (constant without either)."""
    if lr_final is None or not step_limit:
        return lr
    return lr + (lr_final - lr) * min(step, step_limit) / step_limit


class TrainLoop:
    """Train a ``VQDraw`` model; everything is a keyword argument, nothing reads argv.

    :param model: the model (``create_model``); moved to ``device``.
    :param train_data: dataset of images in [0, 1] (``data.load_dataset``).
    :param test_data: held-out dataset; its first ``eval_size`` images are evaluated every
                      ``eval_interval`` steps, and all of it when the run reaches ``step_limit``.
    :param run_dir: folder for the checkpoint, images and the CSV log.
    :param checkpoint_path: checkpoint file (default ``run_dir/checkpoint.pt``); resumed from
                            when it exists.
    """

    def __init__(self, *, model, train_data, test_data=None, run_dir="runs/run", checkpoint_path=None,
                 batch_size=32, step_interval=1, lr=1e-3, lr_final=None, step_limit=None,
                 save_interval=500, eval_interval=None, eval_size=1000, log_interval=50,
                 device="cpu", seed=0, num_workers=0, bf16=False, final_eval=True, quiet=False):
        for name, value, minimum in (("batch_size", batch_size, 1), ("step_interval", step_interval, 1),
                                     ("save_interval", save_interval, 1), ("log_interval", log_interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if step_limit is not None and (not isinstance(step_limit, int) or step_limit < 1):
            raise ValueError(f"step_limit must be a positive integer, got {step_limit!r}")
        if not lr > 0 or (lr_final is not None and not lr_final >= 0):
            raise ValueError(f"learning rates must be positive (lr={lr}, lr_final={lr_final})")
        self.rank, self.world_size, self.local_rank = _distributed_env()
        if self.world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.run_dir = run_dir
        self.checkpoint_path = checkpoint_path or os.path.join(run_dir, "checkpoint.pt")
        self.batch_size = batch_size
        self.step_interval = step_interval
        self.lr = lr
        self.lr_final = lr_final
        self.step_limit = step_limit
        self.save_interval = save_interval
        self.eval_interval = eval_interval or save_interval
        self.eval_size = eval_size
        self.log_interval = log_interval
        self.seed = seed
        self.num_workers = num_workers
        self.bf16 = bf16
        self.final_eval = final_eval
        self.quiet = quiet
        self.is_main = self.rank == 0
        self.step = 0
        self.last_eval = None
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-5)
        torch.manual_seed(seed + self.rank)
        if os.path.exists(self.checkpoint_path):
            self._resume()
        self.ddp_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self):
        ckpt = read_checkpoint(self.checkpoint_path, map_location="cpu")
        if "optimizer" not in ckpt or "step" not in ckpt:
            raise CheckpointError(f"{self.checkpoint_path} holds weights only (no optimizer state or "
                                  f"step), so training cannot resume from it; use another --run-dir")
        mismatch = config_mismatch(ckpt["config"], self.model.config)
        if mismatch:
            raise CheckpointError(f"{self.checkpoint_path} is for another architecture: {mismatch}; "
                                  f"use the same settings or another --run-dir")
        self.model.load_state_dict(model_from_checkpoint(ckpt, self.checkpoint_path).state_dict())
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        rng = ckpt.get("rng", {})
        if "torch" in rng and ckpt.get("world_size", 1) == self.world_size:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self._log(f"resumed from {self.checkpoint_path} at step {self.step}")

    def state(self):
        """Everything needed to continue: config, weights, optimizer, step and RNG states."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": dict(self.model.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": rng,
            "world_size": self.world_size,
            "train": dict(batch_size=self.batch_size, step_interval=self.step_interval, lr=self.lr,
                          lr_final=self.lr_final, step_limit=self.step_limit, seed=self.seed),
        }

    def save(self):
        if not self.is_main:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights became non-finite before step {self.step}; the last "
                                     f"checkpoint is kept; lower --lr")
        save_checkpoint(self.checkpoint_path, self.state())
        from .images import save_progress_images
        if self.test_data is not None:
            save_progress_images(self.model, fixed_images(self.test_data, 32), self.run_dir)
        from .images import plot_log
        plot_log(self.log_path, os.path.join(self.run_dir, "loss.png"))

    # ------------------------------------------------------------------ the loop

    @property
    def log_path(self):
        return os.path.join(self.run_dir, "log.csv")

    def run(self):
        """Train until ``step_limit`` (forever without one). Returns the last evaluation."""
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        sampler = BatchSampler(len(self.train_data), self.batch_size, seed=self.seed, start=self.step,
                               rank=self.rank, world_size=self.world_size)
        self._on_device_data()
        batches = iterate_batches(self.train_data, sampler, self.num_workers)
        self.model.train()
        totals, count = {}, 0
        last_time, last_step = time.time(), self.step
        while self.step_limit is None or self.step < self.step_limit:
            terms = self._update(batches)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            done = self.step_limit is not None and self.step >= self.step_limit
            if self._crossed(self.eval_interval) or done:
                self.last_eval = self._evaluate(self.eval_size)
            if self._crossed(self.log_interval) or done:
                now = time.time()
                self._log_line(self._reduce(totals, count), (self.step - last_step) / (now - last_time))
                totals, count = {}, 0
                last_time, last_step = now, self.step
            if self._crossed(self.save_interval) or done:
                self.save()
        if self.final_eval and self.test_data is not None and self.step_limit is not None:
            self.last_eval = self._evaluate(len(self.test_data), final=True)
        return self.last_eval

    def _crossed(self, interval):
        """Whether the last update passed a multiple of ``interval`` steps."""
        before = self.step - self._last_update_size
        return self.step // interval > before // interval

    def _update(self, batches):
        """One optimizer update over up to ``step_interval`` micro-batches; returns metrics."""
        micro = self.step_interval
        if self.step_limit is not None:
            micro = min(micro, self.step_limit - self.step)
        lr = learning_rate(self.step, self.lr, self.lr_final, self.step_limit)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = {}
        for i in range(micro):
            images = next(batches).to(self.device, non_blocking=True)
            x = self.model.normalize(images)
            # DDP: synchronize gradients only on the last micro-batch.
            sync = self.ddp_model is self.model or i == micro - 1
            with (nullcontext() if sync else self.ddp_model.no_sync()), self._autocast():
                terms = self.ddp_model(x)
                (terms["loss"] / micro).backward()
            for key in ("loss", "chosen_loss", "aux_loss", "final_loss"):
                sums[key] = sums.get(key, 0.0) + terms[key].detach()
            sums["code_entropy"] = sums.get("code_entropy", 0.0) + terms["code_entropy"].mean()
            sums["options_used"] = sums.get("options_used", 0.0) + terms["options_used"].float().mean()
        self.optimizer.step()
        self.step += micro
        self._last_update_size = micro
        # Metrics stay on the device: converting them here would wait for the GPU every step.
        return {key: value / micro for key, value in sums.items()} | {"lr": lr}

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _on_device_data(self):
        """Small in-memory datasets live on the GPU as uint8 so that loading never waits."""
        from .data import ArrayDataset
        if self.device.type == "cuda" and isinstance(self.train_data, ArrayDataset):
            self.train_data = type(self.train_data)(self.train_data.images.to(self.device),
                                                    self.train_data.labels)

    def _reduce(self, totals, count):
        """Average the interval's metrics over updates and, under DDP, over processes."""
        keys = sorted(totals)
        values = torch.stack([torch.as_tensor(totals[k], dtype=torch.float64, device=self.device)
                              for k in keys]) / count
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        metrics = dict(zip(keys, values.tolist()))
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the loss became {metrics['loss']} before step {self.step}; "
                                     f"lower --lr or check the data")
        return metrics

    def _evaluate(self, size, final=False):
        if self.test_data is None:
            return None
        result = None
        if self.is_main:
            images = fixed_images(self.test_data, size) if not final else self.test_data
            result = evaluate(self.model, images, device=self.device)
            result["options"] = self.model.options
            if final:
                self._log(f"held-out evaluation on all {result['count']} test images at step "
                          f"{self.step}:\n" + format_table(result))
                import json
                with open(os.path.join(self.run_dir, "final_eval.json"), "w") as f:
                    json.dump({k: v for k, v in result.items() if k != "codes"} |
                              {"step": self.step, "config": self.model.config}, f, indent=2)
        self.model.train()
        return result

    # ------------------------------------------------------------------ logging

    def _log(self, message):
        if self.is_main and not self.quiet:
            print(message, flush=True)

    def _log_line(self, metrics, steps_per_sec):
        if not self.is_main:
            return
        row = {"step": self.step, "time": round(time.time(), 1)}
        row.update({k: round(v, 6) for k, v in metrics.items()})
        if self.last_eval is not None:
            row["test_mse"] = round(self.last_eval["final_mse"], 6)
            row["test_entropy"] = round(sum(self.last_eval["entropy"]) / len(self.last_eval["entropy"]), 4)
            row["test_used"] = min(self.last_eval["options_used"])
        row["steps_per_sec"] = round(steps_per_sec, 3)
        new_file = not os.path.exists(self.log_path)
        fields = ["step", "time", "loss", "chosen_loss", "aux_loss", "final_loss", "code_entropy",
                  "options_used", "lr", "test_mse", "test_entropy", "test_used", "steps_per_sec"]
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        left = ""
        if self.step_limit is not None and steps_per_sec > 0:
            left = f" left {_duration((self.step_limit - self.step) / steps_per_sec)}"
        test = f" test {row['test_mse']:.5f}" if "test_mse" in row else ""
        limit = f"/{self.step_limit}" if self.step_limit else ""
        self._log(f"step {self.step}{limit} loss {metrics['loss']:.5f} final {metrics['final_loss']:.5f}"
                  f"{test} entropy {metrics['code_entropy']:.3f} used {metrics['options_used']:.1f}"
                  f" lr {metrics['lr']:.2e} {steps_per_sec:.2f} steps/s{left}")


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _distributed_env():
    """(rank, world_size, local_rank), initializing the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank
