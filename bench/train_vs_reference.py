"""One training step of demixlab against the reference trainer's step, per family, side by side.

    python bench/train_vs_reference.py [--families umx,hdemucs,htdemucs,slicq_cdae,bs_roformer]
                                       [--batch 2] [--seconds 3] [--steps 4] [--device cpu]

Same model (the reference's weights loaded into demixlab's), same batch, same loss, same
optimizer. A step is forward, loss, backward and the optimizer (and the EMA updates the recipe
has); the reference steps follow the reference trainers' loop bodies:

- umx: openunmix's train.py (per target: STFT + ComplexNorm encoder, `unmix(X)`, MSE to the
  target's magnitude, backward, Adam step); its four target models, against demixlab's one model
  of four targets.
- hdemucs, htdemucs: demucs' solver `_run_one_stage` (augmentations off): `model(mix)`, per-source
  L1, the Python loop of per-parameter gradient norms, Adam step, two batch EMAs.
- slicq_cdae: xumx-sliCQ-V2's `loop`: its sliCQT of mixture and targets, `Unmix`, its complex MSE
  and mask-sum criteria, AdamW step; demixlab's side takes the solver's optimizer (fused AdamW,
  the same settings).
- bs_roformer: the community class (audio-separator's), `model(mix, target=...)` (its own loss),
  AdamW step, against demixlab's objective (the same loss).

Prints the median step time of each (after a warm-up), interleaving the two so that a busy
machine slows both alike, and the ratio demixlab / reference.
"""
import argparse
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demixlab.models import get_family  # noqa: E402
from demixlab.training.allocator import tune_cpu_runtime  # noqa: E402
from demixlab.training.optim import ModelEMA, OptimConfig, build_optimizer  # noqa: E402
from tests.references import import_reference, import_roformer_reference  # noqa: E402

SOURCES = ["drums", "bass", "other", "vocals"]
Step = tp.Callable[[], None]


def umx(batch: torch.Tensor, device: torch.device) -> tp.Tuple[Step, Step]:
    import_reference("openunmix")
    from openunmix import model as reference_model
    from openunmix.transforms import make_filterbanks

    torch.manual_seed(0)
    targets = {name: reference_model.OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487).to(device)
               for name in SOURCES}
    stft, _ = make_filterbanks(n_fft=4096, n_hop=1024, center=False, sample_rate=44100.0)
    encoder = torch.nn.Sequential(stft, reference_model.ComplexNorm(mono=False)).to(device)
    optimizers = {name: torch.optim.Adam(target.parameters(), lr=1e-3, weight_decay=1e-5)
                  for name, target in targets.items()}
    mixture = batch.sum(dim=1)

    def reference_step() -> None:
        for index, (name, unmix) in enumerate(targets.items()):
            optimizers[name].zero_grad()
            predicted = unmix(encoder(mixture))
            loss = torch.nn.functional.mse_loss(predicted, encoder(batch[:, index].contiguous()))
            loss.backward()
            optimizers[name].step()

    family = get_family("umx")
    ours = family.build_model(SOURCES, 44100, 2, {}).to(device)
    ours.load_state_dict({f"targets.{name}.{key}": value for name, target in targets.items()
                          for key, value in target.state_dict().items() if key in ours.targets[name].state_dict()})
    return reference_step, _demixlab_step(family, ours, batch, torch.optim.Adam(ours.parameters(), lr=1e-3,
                                                                               weight_decay=1e-5))


def demucs(name: str) -> tp.Callable[[torch.Tensor, torch.device], tp.Tuple[Step, Step]]:
    def build(batch: torch.Tensor, device: torch.device) -> tp.Tuple[Step, Step]:
        import_reference("demucs")
        from demucs.ema import ModelEMA as DemucsEMA
        from demucs.hdemucs import HDemucs
        from demucs.htdemucs import HTDemucs

        torch.manual_seed(0)
        segment = batch.shape[-1] / 44100
        reference = (HDemucs(SOURCES) if name == "hdemucs" else HTDemucs(SOURCES, segment=segment)).to(device)
        optimizer = torch.optim.Adam(reference.parameters(), lr=3e-4)
        emas = [DemucsEMA(reference, decay, device=device) for decay in (0.9995, 0.9999)]
        mixture = batch.sum(dim=1)

        def reference_step() -> None:
            estimate = reference(mixture)
            loss = torch.nn.functional.l1_loss(estimate, batch, reduction="none").mean((2, 3)).mean(0)
            loss = loss.sum() / len(SOURCES)
            loss.backward()
            grad_norm = 0
            for parameter in reference.parameters():
                if parameter.grad is not None:
                    grad_norm += parameter.grad.data.norm() ** 2
            optimizer.step()
            optimizer.zero_grad()
            for ema in emas:
                ema.update()

        family = get_family(name)
        options = {} if name == "hdemucs" else {"segment": segment}
        ours = family.build_model(SOURCES, 44100, 2, {**_class_defaults(name), **options}).to(device)
        ours.load_state_dict(reference.state_dict())
        our_optimizer = torch.optim.Adam(ours.parameters(), lr=3e-4)
        return reference_step, _demixlab_step(family, ours, batch, our_optimizer,
                                              [ModelEMA(ours, decay) for decay in (0.9995, 0.9999)])
    return build


def _class_defaults(name: str) -> tp.Dict[str, tp.Any]:
    """demixlab's constructor defaults are the reference's: no options needed."""
    return {}


def slicq_cdae(batch: torch.Tensor, device: torch.device) -> tp.Tuple[Step, Step]:
    import types

    sys.modules.setdefault("auraloss", types.ModuleType("auraloss"))  # only its SDR criterion needs it
    transforms = import_reference("xumx_slicq_v2.transforms")
    reference_model = import_reference("xumx_slicq_v2.model")
    criteria = import_reference("xumx_slicq_v2.loss")
    from demixlab.models.slicq.cdae import REFERENCE_TARGETS, load_reference_state_dict

    base = transforms.NSGTBase("bark", 262, 32.9, fs=44100.0, device=str(device))
    forward, _ = transforms.make_filterbanks(base)
    forward = forward.to(device)
    mixture = batch.sum(dim=1)
    torch.manual_seed(0)
    reference = reference_model.Unmix(transforms.ComplexNorm()(forward(mixture))).to(device)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=1e-5)
    mse, mask = criteria.ComplexMSELossCriterion(), criteria.MaskSumLossCriterion()
    order = [SOURCES.index(name) for name in REFERENCE_TARGETS]
    targets = batch[:, order].transpose(0, 1)  # (targets, B, C, T) in the reference's order

    def reference_step() -> None:
        estimates, masks = reference(forward(mixture), return_masks=True)
        loss = mse(estimates, forward(targets)) + mask(masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    family = get_family("slicq_cdae")
    ours = family.build_model(SOURCES, 44100, 2, {}).to(device)
    load_reference_state_dict(ours, reference.state_dict())
    # The solver's optimizer (build_optimizer: fused AdamW) with the reference's settings.
    optimizer = build_optimizer(ours, OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-5))
    return reference_step, _demixlab_step(family, ours, batch, optimizer)


def bs_roformer(batch: torch.Tensor, device: torch.device) -> tp.Tuple[Step, Step]:
    from demixlab.models.roformer.model import PAPER_FREQS_PER_BANDS

    torch.manual_seed(0)
    reference = import_roformer_reference("bs_roformer").BSRoformer(
        dim=384, depth=6, stereo=True, num_stems=4, time_transformer_depth=1, freq_transformer_depth=1,
        freqs_per_bands=tuple(PAPER_FREQS_PER_BANDS), stft_hop_length=441, attn_dropout=0.0, ff_dropout=0.0,
        mask_estimator_depth=2).to(device)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=5e-4)
    frames = batch.shape[-1] // 441 * 441
    batch = batch[..., :frames]
    mixture = batch.sum(dim=1)

    def reference_step() -> None:
        loss = reference(mixture, target=batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    family = get_family("bs_roformer")
    ours = family.build_model(SOURCES, 44100, 2, dict(attention_gates=True, dim_head=64, attn_dropout=0.0,
                                                      ff_dropout=0.0)).to(device)
    ours.load_state_dict(reference.state_dict())
    return reference_step, _demixlab_step(family, ours, batch, torch.optim.AdamW(ours.parameters(), lr=5e-4))


def _demixlab_step(family: tp.Any, model: torch.nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer,
                   emas: tp.Sequence[ModelEMA] = ()) -> Step:
    """demixlab's solver step (see Solver._train_epoch): objective, backward, gradient norm, step, EMAs."""
    objective = family.objective(model, {})
    model.train()
    mixture = batch.sum(dim=1)

    def step() -> None:
        loss = objective(model, mixture, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        optimizer.step()
        for ema in emas:
            ema.update()

    return step


FAMILIES = {"umx": umx, "hdemucs": demucs("hdemucs"), "htdemucs": demucs("htdemucs"), "slicq_cdae": slicq_cdae,
            "bs_roformer": bs_roformer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tune_cpu_runtime()  # as `dora run` (the reference steps run in the same process and benefit alike)
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"training step, batch {args.batch} x {args.seconds:g} s stereo, 4 sources, {label}, median of "
          f"{args.steps} after a warm-up")
    print(f"{'family':12} {'reference s':>12} {'demixlab s':>11} {'ratio':>6}")
    for name in args.families.split(","):
        batch = 0.1 * torch.randn(args.batch, len(SOURCES), 2, int(args.seconds * 44100),
                                  generator=torch.Generator().manual_seed(1)).to(device)
        reference_step, our_step = FAMILIES[name](batch, device)
        times: tp.Dict[str, tp.List[float]] = {"reference": [], "demixlab": []}
        for index in range(args.steps + 1):
            for label, step in (("reference", reference_step), ("demixlab", our_step)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if index:
                    times[label].append(time.perf_counter() - begin)
        reference_time, our_time = (statistics.median(times[key]) for key in ("reference", "demixlab"))
        print(f"{name:12} {reference_time:12.3f} {our_time:11.3f} {our_time / reference_time:6.2f}", flush=True)


if __name__ == "__main__":
    main()
