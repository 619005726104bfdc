"""The published recipe of each family on MUSDB18-HQ.

    dora grid baselines     # after editing MUSDB_ROOT, or pass dset.root through your own copy

Each family's recipe lives in demixlab/conf/model/NAME.yaml; this grid only adds the dataset and the
resources a full training run needs.
"""
from ._explorers import DemixExplorer

MUSDB_ROOT = "/datasets/musdb18hq"  # edit for your cluster


@DemixExplorer
def explorer(launcher):
    launcher.bind_({"dset": "musdb18hq", "dset.root": MUSDB_ROOT})
    # Open-Unmix family: small LSTM models, one GPU each is plenty.
    umx = launcher.bind({"test.every": 50})
    umx.slurm_(gpus=1, mem_per_gpu=32, cpus_per_gpu=10, time=3 * 24 * 60)
    umx({"model": "umx"})
    umx({"model": "xumx"})
    # Hybrid Demucs family: the reference trained on 8 GPUs (batch 64 / 32).
    demucs = launcher.bind()
    demucs.slurm_(gpus=8, mem_per_gpu=40, cpus_per_gpu=10, time=3 * 24 * 60)
    demucs({"model": "hdemucs"})
    demucs({"model": "htdemucs"})
