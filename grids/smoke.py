"""Tiny CPU experiments on the synthetic dataset, to check a cluster (or tests/slurm) end to end.

    dora grid smoke                      # submit to Slurm and monitor
    python -m tools.grid_local smoke     # or run them one after another on this machine
"""
from ._explorers import DemixExplorer

TINY_TOY = {
    "dset.toy.train_tracks": 2, "dset.toy.valid_tracks": 1, "dset.toy.test_tracks": 1,
    "dset.toy.train_duration": 4.0, "dset.toy.eval_duration": 3.0,
    "epochs": 2, "batch_size": 2, "segment": 1.0, "samples_per_track": 2, "test.sdr": False,
    "misc.device": "cpu",
}


@DemixExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, mem_per_gpu=3, cpus_per_gpu=1, time=30)
    launcher.bind_(TINY_TOY)
    launcher({"model.hidden_size": 16, "model.nb_layers": 1})
    launcher({"model": "xumx", "model.hidden_size": 16, "model.nb_layers": 1})
    launcher({"model": "hdemucs", "model.channels": 4, "model.nfft": 256, "model.depth": 4, "ema.decays": []})
    # Two processes (gloo on CPU): a node's 'GPUs' only decide the number of tasks here.
    launcher.slurm(gpus=2, mem_per_gpu=2)({"model.hidden_size": 16, "model.nb_layers": 1, "seed": 1})
