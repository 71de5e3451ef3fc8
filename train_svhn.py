"""Train VQ-DRAW on svhn; see README.md for the published command and flags."""

from vq_draw.train_cli import main

if __name__ == "__main__":
    main("svhn")
