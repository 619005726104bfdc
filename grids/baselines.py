"""The published recipe of each family on MUSDB18-HQ.

    dora grid baselines     # after editing MUSDB_ROOT, or pass dset.root through your own copy

Each family's recipe lives in conf/model/NAME.yaml; this grid only adds the dataset and the
resources a full training run needs.
"""
from ._explorers import DemixExplorer

MUSDB_ROOT = "/datasets/musdb18hq"  # edit for your cluster


@DemixExplorer
def explorer(launcher):
    launcher.slurm_(gpus=4, mem_per_gpu=40, cpus_per_gpu=8, time=3 * 24 * 60)
    launcher.bind_({"dset": "musdb18hq", "dset.root": MUSDB_ROOT, "test.every": 50})
    launcher({"model": "umx"})
