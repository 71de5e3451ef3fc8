"""Export a training checkpoint as a small weights-and-config file for ``load_model``.

``python -m vq_draw.export runs/mnist/checkpoint.pt pretrained/mnist_model.pt``
drops the optimizer and RNG state and stores the weights in the file's own format;
the steps it was trained for are kept for the record (``trained_steps``, which for
a fine-tune (``--init-from``) include the ``prior_steps`` of its source). The work
is ``checkpoint.export_checkpoint``; this module is its command line.

The output may replace an earlier export, but never the checkpoint it reads nor any
training state (which could then no longer resume): both are refused before anything is
written.
"""

import sys

from .arguments import Parser
from .checkpoint import CheckpointError, SaveError, check_model_output, export_checkpoint


def main(argv=None):
    parser = Parser(prog="python -m vq_draw.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint (or an exported model)")
    parser.add_argument("output", help="where to write the weights-only file (not a training "
                                       "checkpoint, nor the input)")
    args = parser.parse_args(argv)
    try:
        check_model_output(args.output, [args.checkpoint])
        model, state = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, SaveError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters"
          + (f", trained {state['trained_steps']} steps)" if "trained_steps" in state else ")"))


if __name__ == "__main__":
    main()
