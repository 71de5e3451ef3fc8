"""The settings of a training run as one object: ``TrainSettings``, checked in one place.

A *step* is one micro-batch per process, as in the original's flags. The optimizer updates
once every ``step_interval`` steps; ``step_limit``, ``stop_at``, the intervals and the
learning-rate schedule all count steps. The command line builds a ``TrainSettings``,
``TrainLoop`` runs it, checkpoints record its recipe (``recipe``) and a resume compares it.
"""

import dataclasses
from dataclasses import dataclass

# The original's Adam settings; the published learning rate is TrainSettings.lr.
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-5

# How an update combines the gradients of its micro-batches (each the gradient of the mean loss
# over its images): "sum", as the original, or "mean", so that k micro-batches of b images give
# the gradient of one batch of k * b. Adam is not scale-free: its eps (1e-5) is larger than most
# gradient elements of the published CIFAR-10 model, so the mean trains visibly slower there
# (docs/experiments/cifar_celeba.md).
ACCUMULATE = ("sum", "mean")

# The settings that change the numbers a run computes: checkpoints record them and a resume
# names those that differ. bf16 is among them because a run resumed in another precision no
# longer repeats the uninterrupted one bit for bit.
RECIPE = ("batch_size", "step_interval", "accumulate", "lr", "lr_final", "step_limit", "seed", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """The recipe and schedule of a training run; invalid values raise ``ValueError`` (one line).

    :param batch_size: images per micro-batch (per process under torchrun).
    :param step_interval: micro-batches per optimizer update.
    :param accumulate: "sum" (the original's) or "mean" (see ``ACCUMULATE``).
    :param lr: the learning rate at step 0.
    :param lr_final: the rate at ``step_limit``, linear in between; None keeps ``lr``.
    :param step_limit: steps to train; None trains forever.
    :param stop_at: save and return at the first update boundary at or past this step, while
                    the schedule still follows ``step_limit`` (a long run in slices).
    :param save_interval: steps between checkpoints.
    :param eval_interval: steps between held-out evaluations (None: ``save_interval``).
    :param eval_size: held-out images per periodic evaluation.
    :param log_interval: steps between log rows.
    :param seed: the seed of the batch order and of each process's exploration.
    :param bf16: bfloat16 autocast (the choices are still made on float32 losses).
    :param final_eval: evaluate the whole test set once at ``step_limit``.
    """

    batch_size: int = 32
    step_interval: int = 1
    accumulate: str = "sum"
    lr: float = 1e-3
    lr_final: float | None = None
    step_limit: int | None = None
    stop_at: int | None = None
    save_interval: int = 500
    eval_interval: int | None = None
    eval_size: int = 1000
    log_interval: int = 50
    seed: int = 0
    bf16: bool = False
    final_eval: bool = True

    def __post_init__(self):
        for name in ("batch_size", "step_interval", "save_interval", "log_interval", "eval_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("step_limit", "stop_at", "eval_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or (self.lr_final is not None and not self.lr_final >= 0):
            raise ValueError(f"learning rates must be positive (lr={self.lr}, lr_final={self.lr_final})")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}, got {self.accumulate!r}")

    @classmethod
    def fields(cls):
        return tuple(field.name for field in dataclasses.fields(cls))

    def replace(self, **changes):
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def evaluate_every(self):
        return self.eval_interval or self.save_interval

    def recipe(self):
        """{name: value} of the settings that a checkpoint records (``RECIPE``)."""
        return {name: getattr(self, name) for name in RECIPE}

    def learning_rate(self, step):
        """The rate of the update that ends at ``step`` (``learning_rate``)."""
        return learning_rate(step, self.lr, self.lr_final, self.step_limit)


def learning_rate(step, lr, lr_final, step_limit):
    """The rate of the update that ends at ``step`` (micro-batches done, this update's included):
    linear from ``lr`` at step 0 to ``lr_final`` at ``step_limit`` (constant without either)."""
    if lr_final is None or not step_limit:
        return lr
    return lr + (lr_final - lr) * min(step, step_limit) / step_limit


def check_settings(**settings):
    """Raise ValueError with one line for a training setting out of range (``TrainSettings``)."""
    TrainSettings(**settings)
