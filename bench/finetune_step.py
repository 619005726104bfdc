"""Time one training step of a family: all weights, with `finetune.freeze`, and with LoRA adapters.

    python bench/finetune_step.py [--family umx] [--batch 2] [--seconds 2] [--steps 5] [--rank 8]
        [--freeze 'targets.*.lstm.*'] [--device auto]

Each mode builds the family's published model (conf/model/FAMILY.yaml), applies the fine-tuning
options as the solver does (:func:`demixlab.training.finetune.apply_finetune`), and times the
family's objective, backward and an Adam update over the trainable parameters on random stereo
audio at 44.1 kHz. Prints, per mode, the trainable parameters and the median step time after the
first step.
"""
import argparse
import statistics
import time
import typing as tp

import torch

from demixlab.models import get_family
from demixlab.train import main as dora_main
from demixlab.training.config import parse_config
from demixlab.training.finetune import FinetuneConfig, LoraConfig, apply_finetune, trainable_summary

SOURCES = ["drums", "bass", "other", "vocals"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(family_name: str, finetune: FinetuneConfig, label: str, device: torch.device, batch: int, seconds: float,
        steps: int) -> None:
    """Time `steps` training steps of the published `family_name` under `finetune`; print one line."""
    config = parse_config(dora_main.get_xp([f"model={family_name}"]).cfg)
    family = get_family(family_name)
    torch.manual_seed(0)
    model = family.build_model(SOURCES, 44100, 2, config.model_options)
    apply_finetune(model, finetune)
    model.to(device).train()
    objective = family.objective(model, config.loss)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sources = (torch.randn(batch, len(SOURCES), 2, int(seconds * 44100)) * 0.1).to(device)
    times: tp.List[float] = []
    for _ in range(steps):
        _sync(device)
        begin = time.perf_counter()
        loss = objective(model, sources.sum(1), sources)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - begin)
    median = statistics.median(times[1:] if len(times) > 1 else times)
    print(f"{family_name:<12} {label:<24} {trainable_summary(model):<48} step {median:.3f} s", flush=True)


def main() -> None:
    """Parse the options and time the three modes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="umx")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--freeze", default="targets.*.lstm.*", help="a finetune.freeze pattern")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    modes = [("all weights", FinetuneConfig()),
             (f"freeze {args.freeze}", FinetuneConfig(freeze=[args.freeze])),
             (f"lora rank {args.rank}", FinetuneConfig(lora=LoraConfig(enabled=True, rank=args.rank,
                                                                        alpha=float(args.rank))))]
    for label, finetune in modes:
        run(args.family, finetune, label, device, args.batch, args.seconds, args.steps)


if __name__ == "__main__":
    main()
