"""The benchmark's measure of the training loop (vq_draw/tools/bench.py): the work around
the step (data, log lines, evaluations, saves), amortized at the run's intervals.
"""

import time

import torch

from ..config import DATASETS, create_model

def loop_overhead(dataset="mnist", data_dir=None, steps=20, batch_size=32, log_interval=50,
                  save_interval=250, eval_interval=1000, eval_size=1000, options=64, stages=None,
                  device="cpu", seed=0):
    """The training loop's work around the step, amortized at the given intervals.

    Runs ``TrainLoop`` for ``steps`` steps (the last one logs, evaluates ``eval_size`` test
    images and saves, as the end of a run does) and times each part: fetching the batch,
    the step itself, a log line, an evaluation and a save (checkpoint, images, loss plot).
    Data from ``data_dir`` (``data.load_dataset``), or random uint8 images when None.

    :return: dict of seconds ("step", "data" per step; "log", "eval", "save" per event;
             "other" per step) and "overhead", the loop's amortized time per step over the
             step time.
    """
    import tempfile

    from ..data import ArrayDataset, load_dataset
    from ..train import TrainLoop

    if data_dir is None:
        gen = torch.Generator().manual_seed(seed)
        shape = DATASETS[dataset]["shape"]
        train = ArrayDataset(torch.randint(0, 256, (4096, *shape), dtype=torch.uint8, generator=gen))
        test = ArrayDataset(torch.randint(0, 256, (max(eval_size, 1), *shape), dtype=torch.uint8,
                                          generator=gen))
    else:
        train, test = load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)
    torch.manual_seed(seed)
    model = create_model(dataset, options=options, stages=stages)  # the default segment
    spent = {"data": 0.0, "update": 0.0, "log": 0.0, "eval": 0.0, "save": 0.0}
    counts = dict.fromkeys(spent, 0)

    def timer(name, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                counts[name] += 1
        return wrapped

    class TimedBatches:
        def __init__(self, batches):
            self.batches = batches

        def __next__(self):
            start = time.perf_counter()
            try:
                return next(self.batches)
            finally:
                spent["data"] += time.perf_counter() - start
                counts["data"] += 1

    with tempfile.TemporaryDirectory() as run_dir:
        loop = TrainLoop(model=model, train_data=train, test_data=test, run_dir=run_dir,
                         batch_size=batch_size, step_limit=steps, save_interval=save_interval,
                         eval_interval=eval_interval, eval_size=eval_size, log_interval=log_interval,
                         device=device, seed=seed, final_eval=False, quiet=True, progress=False)
        update = timer("update", loop._update)
        loop._update = lambda batches: update(TimedBatches(batches))
        loop._log_line = timer("log", loop._log_line)
        loop._evaluate = timer("eval", loop._evaluate)
        loop.save = timer("save", loop.save)
        start = time.perf_counter()
        loop.run()
        total = time.perf_counter() - start
    step = (spent["update"] - spent["data"]) / steps
    per_event = {k: spent[k] / max(counts[k], 1) for k in ("log", "eval", "save")}
    other = (total - sum(spent[k] for k in ("update", "log", "eval", "save"))) / steps
    amortized = (spent["data"] / steps + per_event["log"] / log_interval + per_event["eval"] / eval_interval
                 + per_event["save"] / save_interval + other)
    return {"step": step, "data": spent["data"] / steps, **per_event, "other": other,
            "overhead": amortized / step, "steps": steps, "batch_size": batch_size,
            "intervals": dict(log=log_interval, save=save_interval, eval=eval_interval,
                              eval_size=eval_size), "data_dir": data_dir}
