"""Export a training checkpoint as a small weights-and-config file for ``load_model``.

``python -m vq_draw.export runs/mnist/checkpoint.pt pretrained/mnist_model.pt``
drops the optimizer and RNG state and stores the weights in the file's own format;
the steps it was trained for are kept for the record (``trained_steps``, which for
a fine-tune (``--init-from``) include the ``prior_steps`` of its source). The work
is ``checkpoint.export_checkpoint``; this module is its command line.
"""

import argparse
import sys

from .checkpoint import CheckpointError, SaveError, export_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint (or an exported model)")
    parser.add_argument("output", help="where to write the weights-only file")
    args = parser.parse_args(argv)
    try:
        model, state = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, SaveError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters"
          + (f", trained {state['trained_steps']} steps)" if "trained_steps" in state else ")"))


if __name__ == "__main__":
    main()
