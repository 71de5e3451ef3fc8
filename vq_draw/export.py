"""Export a training checkpoint as a small weights-and-config file for ``load_model``.

``python -m vq_draw.export runs/mnist/checkpoint.pt pretrained/mnist_model.pt``
drops the optimizer and RNG state and stores the weights in the file's own
format; the steps it was trained for are kept for the record (``trained_steps``,
which for a fine-tune (``--init-from``) include the ``prior_steps`` of its source).
"""

import argparse
import sys

from .config import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, model_from_checkpoint,
                     read_checkpoint, steps_behind)
from .train import SaveError, save_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint (or an exported model)")
    parser.add_argument("output", help="where to write the weights-only file")
    args = parser.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt, args.checkpoint)
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                 "config": dict(model.config), "model": model.state_dict()}
        if "step" in ckpt:
            state["trained_steps"] = steps_behind(ckpt)
            if ckpt.get("prior_steps"):
                state["prior_steps"] = int(ckpt["prior_steps"])
            state["train"] = ckpt.get("train", {})
        save_checkpoint(args.output, state)
    except (CheckpointError, SaveError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters"
          + (f", trained {state['trained_steps']} steps)" if "trained_steps" in state else ")"))


if __name__ == "__main__":
    main()
