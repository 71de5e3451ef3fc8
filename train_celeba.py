"""Train VQ-DRAW on celeba; see README.md for the published command and flags."""

try:
    from vq_draw.train_cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported: nothing started, no traceback
    raise SystemExit(130)

if __name__ == "__main__":
    main("celeba")
