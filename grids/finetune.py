"""Second stage: fine-tune every finished XP of another grid (default: baselines).

    dora grid finetune
    FINETUNE_PARENT_GRID=smoke dora grid finetune      # or python -m tools.grid_local finetune

Each child replays its parent's overrides and starts from its best weights (`continue_from`) with
`variant=finetune` (short schedule, lower learning rate, no remixing), on the parent's resources.
Parents that have not finished training are skipped, with a message.
"""
import importlib
import os

from demixlab.experiment import grid_experiments
from demixlab.train import main

from ._explorers import DemixExplorer


@DemixExplorer
def explorer(launcher):
    parent_grid = os.environ.get("FINETUNE_PARENT_GRID", "baselines")
    parent = importlib.import_module(f"{__package__}.{parent_grid}").explorer
    for sheep, slurm in grid_experiments(main, parent):
        sheep.xp.link.load()
        history = sheep.xp.link.history
        epochs = sheep.xp.cfg.epochs
        if not history or "test" not in history[-1]:
            print(f"finetune: skipping {sheep.xp.sig}: training not finished ({len(history)}/{epochs} epochs)")
            continue
        child = launcher.bind(sheep.xp.argv)
        child.slurm_(gpus=slurm.gpus, mem_per_gpu=slurm.mem_per_gpu, cpus_per_gpu=slurm.cpus_per_gpu, time=slurm.time)
        child({"continue_from": sheep.xp.sig, "variant": "finetune"})
