"""Train a U-Net variant: ``python train.py [hydra overrides]``. See README.md."""

from tumorseg.train import main

if __name__ == "__main__":
    main()
