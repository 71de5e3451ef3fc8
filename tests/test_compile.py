"""The compiled training step (``VQDraw.compile_step``, the training scripts' ``--compile``).

Each stage after the first compiles with ``torch.compile(fullgraph=True)`` (a graph break
would raise) into one graph per network, whatever the stage, and gives eager training's
codes, losses and gradients: with segments, checkpointing, exploration and accumulation.
Tiny models in float64 (their float32 gradients differ in the last bits, which sums of
nearly cancelling terms, such as a bias before GroupNorm, make visible), and the ``aot_eager`` backend (the graphs and their autograd traced as for
inductor, without compiling C++ on a 2-core CI machine); dynamo's counters count the
compiled graphs.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import random_images, tiny_model

# (settings, images): 3 or 4 stages so that at least two stages run compiled; segments of
# one or two stages put them on different networks; checkpointing on the larger ones.
CASES = {
    "mnist": dict(stages=3),
    "svhn": dict(stages=4, segment=2),
    "cifar10": dict(stages=3, segment=1, grad_checkpoint=True),
    "celeba": dict(stages=3, segment=1, grad_checkpoint=True, epsilon=0.5),
}


def compile_fresh(model):
    """``compile_step`` with the aot_eager backend, dynamo's caches and counters cleared."""
    torch._dynamo.reset()
    counters.clear()
    return model.compile_step(backend="aot_eager")


def graphs_compiled():
    assert not counters["graph_break"], dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"]


def assert_same_step(eager, compiled, x, seed=0):
    torch.manual_seed(seed)
    expected = eager(x)
    expected["loss"].backward()
    torch.manual_seed(seed)
    got = compiled(x)
    got["loss"].backward()
    assert torch.equal(got["codes"], expected["codes"])
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["stage_losses"], expected["stage_losses"], rtol=1e-12,
                               atol=1e-14)
    reached = 0
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)
            reached += int(p.grad.abs().sum() > 0)
    assert reached > 5


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_compiled_step_equals_eager_with_one_graph(dataset):
    eager = tiny_model(dataset, **CASES[dataset]).double().train()
    compiled = compile_fresh(copy.deepcopy(eager))
    x = random_images(eager, 3, seed=4).double()
    assert_same_step(eager, compiled, x)
    # Every stage after the first ran compiled, in one graph for all networks and stages.
    assert graphs_compiled() == 1
    # A second micro-batch accumulates into the same gradients, without compiling again.
    x2 = random_images(eager, 3, seed=5).double()
    assert_same_step(eager, compiled, x2, seed=1)
    assert graphs_compiled() == 1


def test_compiled_step_has_no_host_synchronization():
    """No value leaves the device inside the compiled stage: under fullgraph a ``.item()``,
    a branch on a tensor or a data-dependent shape (``torch.unique``) would raise."""
    model = compile_fresh(tiny_model("mnist", stages=3).train())
    x = random_images(model, 2)
    with torch._dynamo.config.patch(capture_scalar_outputs=False,
                                    capture_dynamic_output_shape_ops=False):
        model(x)["loss"].backward()
    assert graphs_compiled() == 1
    # Without gradients (evaluation) the stages run eagerly: nothing more is compiled.
    with torch.no_grad():
        model(x)
    assert graphs_compiled() == 1


def _ddp_worker(rank, port, out_dir):
    """One of two processes: the compiled step under DistributedDataParallel, on its half of
    the batch."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = compile_fresh(tiny_model("svhn", **CASES["svhn"]).double().train())
    x = random_images(model, 4, seed=6).double()[2 * rank:2 * rank + 2]
    ddp = DistributedDataParallel(model)  # held: its hooks average the gradients
    ddp(x)["loss"].backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/grads.pt")
        torch.save(dict(counters["stats"]), f"{out_dir}/stats.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_compiled_step_under_ddp_averages_the_processes_gradients(tmp_path):
    """Two processes, each the compiled step on half the batch: DDP's averaged gradients are
    eager training's gradients of the mean of the two halves' losses."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    grads = torch.load(tmp_path / "grads.pt")
    assert torch.load(tmp_path / "stats.pt")["unique_graphs"] == 1
    eager = tiny_model("svhn", **CASES["svhn"]).double().train()
    x = random_images(eager, 4, seed=6).double()
    ((eager(x[:2])["loss"] + eager(x[2:])["loss"]) / 2).backward()
    reached = 0
    for name, p in eager.named_parameters():
        assert (p.grad is None) == (grads[name] is None), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)
            reached += int(p.grad.abs().sum() > 0)
    assert reached > 5


def test_a_compiled_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path, no_plots):
    """Exact resume in the compiled mode: a run stopped at step 4 and continued by a new
    process-like loop (another model object, compiled anew) ends bit for bit where the
    uninterrupted compiled run ends: weights and Adam's state, with exploration, accumulation
    and a learning-rate schedule."""
    from vq_draw.data import ArrayDataset
    from vq_draw.train import TrainLoop
    from conftest import state_equal

    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    settings = dict(train_data=ArrayDataset(images), batch_size=2, step_interval=2, step_limit=8,
                    save_interval=1000, log_interval=1000, lr_final=0.0, quiet=True)

    def loop(run_dir, seed=0, **extra):
        model = compile_fresh(tiny_model("mnist", stages=3, epsilon=0.3, seed=seed))
        return TrainLoop(model=model, run_dir=str(run_dir), **settings, **extra)

    reference = loop(tmp_path / "ref")
    reference.run()
    first = loop(tmp_path / "run", stop_at=3)
    first.run()
    assert first.step == 4
    rest = loop(tmp_path / "run", seed=9)  # other initial weights: all must come from the file
    assert rest.step == 4
    rest.run()
    assert rest.step == 8
    assert graphs_compiled() == 1
    assert state_equal(rest.model.state_dict(), reference.model.state_dict())
    assert state_equal(rest.optimizer.state_dict(), reference.optimizer.state_dict())
