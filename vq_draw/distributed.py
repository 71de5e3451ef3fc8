"""The processes of a training run: ``compile_refiners``, and ``Processes``, which holds
torchrun's environment and the collectives the loop needs
(gathers, means, rank-0-only work, the shared evaluation). With one process every collective
is a plain local call.
"""

import os
import warnings

import torch
import torch.distributed as dist



def compile_refiners(model):
    """``--compile``: compile each training stage of ``model`` (``VQDraw.compile_step``: one
    graph per network, no graph breaks); the modules and state_dict keys are unchanged."""
    return model.compile_step()


class Processes:
    """This process's place among the processes of a run, and their collectives.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here: NCCL for a
    CUDA ``device``, gloo otherwise. Every collective must be called by every process, in the
    same order.
    """

    def __init__(self, device="cpu"):
        device = str(device)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        self.device = device
        self._flag_group = None  # the gloo group for CPU flags when the default group is NCCL
        if self.world_size > 1:
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if not dist.is_initialized():
                cuda = device.startswith("cuda")
                if cuda:
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def describe(self):
        return f"{self.world_size} processes ({dist.get_backend()})" if self.distributed else "1 process"

    def all_gather(self, obj):
        """A picklable object from every process, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values, device, count=1):
        """{name: the mean over processes of a scalar / ``count``} as floats, for scalars (numbers
        or tensors on ``device``); one float64 reduction for all, the only wait for the GPU."""
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device)
                               for k in keys]) / count
        if self.distributed:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(keys, stacked.tolist()))

    def max_flag(self, value):
        """The largest of every process's integer ``value`` (a CPU collective, also on NCCL runs)."""
        if not self.distributed:
            return value
        if self._flag_group is None:
            # A CPU tensor needs a gloo group; the default one is NCCL on GPUs.
            self._flag_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                                else dist.new_group(backend="gloo"))
        flag = torch.tensor([value])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group)
        return int(flag)

    def main_only(self, fn, what, error=RuntimeError):
        """Run ``fn`` on rank 0; if it fails, every process raises, so none waits forever.

        Under DDP this is also a barrier: the others wait until rank 0 is done. Rank 0 re-raises
        its own exception, the others ``error`` saying that rank 0 could not do ``what``.
        """
        own = None
        if self.is_main:
            try:
                fn()
            except Exception as exc:  # re-raised below, after telling the other processes
                own = exc
        failed = [own is not None]
        if self.distributed:
            dist.broadcast_object_list(failed, src=0)
        if own is not None:
            raise own
        if failed[0]:
            raise error(f"rank 0 could not {what}; see its error message")

    def close(self, device):
        """Leave the process group; every process calls it last."""
        if self.distributed and dist.is_initialized():
            # Every process first passes its last collective: gloo can abort a process whose
            # peer has already torn down the group.
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
            dist.destroy_process_group()

    def wrap(self, model, device):
        """``model`` in DistributedDataParallel under torchrun, else ``model`` itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel
        # A 1-channel conv weight (MNIST's first layer) can get a gradient whose stride differs
        # in the size-1 dimension; DDP then copies it into its bucket, which is correct, yet
        # warns on every process and breaks the progress bar.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def evaluate_shared(model, data, count, processes, device, between_chunks=None, chunk=1000):
    """``evaluate.evaluate`` of the first ``count`` images of ``data``; a collective call that
    returns the merged result on every process.

    Each process encodes its own slice of every chunk of ``chunk`` images, so all do the same
    work (none waits on rank 0). ``between_chunks()`` is called by every process between
    chunks (e.g. to agree on a stop signal, and raise).
    """
    from .evaluate import evaluate, merge_results
    parts = []
    for first in range(0, count, chunk):
        if first and between_chunks is not None:
            between_chunks()
        size = min(chunk, count - first)
        start = first + size * processes.rank // processes.world_size
        stop = first + size * (processes.rank + 1) // processes.world_size
        if stop > start:
            parts.append(evaluate(model, _slice(data, start, stop), device=device))
    parts = [part for ranks in processes.all_gather(parts) for part in ranks]
    return merge_results(parts, model.options)


def _slice(data, start, stop):
    """Images ``start:stop`` of a tensor or dataset, without loading the others."""
    if torch.is_tensor(data):
        return data[start:stop]
    from .data import ArrayDataset
    if isinstance(data, ArrayDataset):
        return ArrayDataset(data.images[start:stop])
    return torch.utils.data.Subset(data, range(start, stop))
