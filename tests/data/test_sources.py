"""`python train.py data=brats_h5|brats|msd data.root=PATH` on small folders in each real layout."""

import pytest

from tests import fixtures
from tests.conftest import compose_tiny, val_dice_of
from tumorseg.train import run

SOURCES = {
    "brats_h5": lambda root: fixtures.write_kaggle_h5(root, volumes=(1, 2, 3, 4), size=32),
    "brats": lambda root: fixtures.write_brats2023(root, ids=(0, 1, 2, 3), shape=(32, 32, 8)),
    "msd": lambda root: fixtures.write_msd(root, ids=(1, 2, 3, 4), shape=(32, 32, 8)),
}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_train_on_each_source(source, tmp_path, demo_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    SOURCES[source](raw)
    cfg = compose_tiny(
        tmp_path,
        demo_root,
        [
            f"data={source}",
            f"data.root={raw}",
            "data.image_size=32",
            "data.min_brain_fraction=0.0",
            "trainer.max_epochs=1",
            "~logger",
            "~callbacks.lr_monitor",
        ],
    )
    score = run(cfg)
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"  # one epoch: the kept weights
    assert score == pytest.approx(val_dice_of(cfg, last), abs=1e-6)
    stores = list((tmp_path / "data" / "cache").glob(f"{raw.name}-*/manifest.json"))
    assert len(stores) == 1  # prepared once into the cache
