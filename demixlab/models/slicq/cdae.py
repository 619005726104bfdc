"""sliCQ-CDAE (xumx-sliCQ-V2, Hanssian 2023): convolutional denoising autoencoders on the ragged
sliced constant-Q transform (sliCQT).

The mixture goes through the sliCQT (Bark scale, 262 bins, 32.9 Hz - 22.05 kHz by default: 70
blocks of different time-frequency resolution). Per block and per source a small convolutional
autoencoder (:mod:`.slicq_blocks`) turns the block magnitude into a sigmoid mask. The masked
magnitudes then go through one differentiable Wiener-EM step per block with the mixture's
complex coefficients (offline mode), or simply take the mixture phase (realtime mode, with a
causal first convolution); the inverse sliCQT gives the waveforms.

Layouts: waveforms (B, C, T) and (B, S, C, T); blocks (B, C, F_b, N, T_b) for N slices of T_b
coefficients; source blocks (B, S, C, F_b, N, T_b).

The reference implementation orders its four targets [bass, vocals, other, drums];
:func:`load_reference_state_dict` maps its state dict onto any order of those names.
"""
import logging
import typing as tp
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ...errors import DemixError
from ...files import atomic_path
from ...spectral import wiener
from ...spectral.slicqt import SliCQT, flatten_slices, unflatten_slices
from ..contract import NetworkAxes, SeparationModel, require
from ..losses import (Objective, combination_loss, non_negative, parse_source_weights, source_subsets,
                      subset_matrix, subset_weights)
from .blocks import SliCQMaskNetwork
from .streaming import BlockCDAEStreamer, SliCQCDAEStreamer

logger = logging.getLogger(__name__)

# Target order of the reference implementation (xumx-slicq-v2 `Unmix`).
REFERENCE_TARGETS = ("bass", "vocals", "other", "drums")
SCALES = ("bark", "mel", "cqlog", "vqlog", "linear", "oct")


@contextmanager
def _full_precision(x: torch.Tensor) -> tp.Iterator[None]:
    """Disable autocast: the transform and the Wiener filter run in float32 even in a bf16 step."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


class SliCQCDAE(SeparationModel):
    """xumx-sliCQ-V2: per-block convolutional denoising autoencoders on the sliCQT.

    `forward(mixture)` separates (B, C, T) waveforms into (B, S, C, T) waveforms (inverse sliCQT
    to the input length); `forward(mixture, for_loss=True)` returns `(estimates, masks)`: per
    block, the complex source estimates (B, S, C, F_b, N, T_b) and the sigmoid masks (same shape,
    real) that the objective compares with the sources' sliCQTs.

    Args:
        sources, samplerate, audio_channels: as every family (any list of distinct names).
        scale, fbins, fmin, fmax: the sliCQT's frequency scale (see SCALES), number of bins and
            range in Hz (fmax at most half the sample rate).
        hidden_1, hidden_2: channels of the autoencoders (50 and 51 published).
        realtime: causal first convolution and the mixture phase instead of the Wiener step.
        wiener_iterations: Wiener-EM iterations per block in offline mode (1 published; 0: the
            masked magnitudes with the mixture phase).
        wiener_window: flattened coefficients per Wiener window (bounds memory on long tracks;
            5000 as the reference).

    Attributes:
        min_length: fewest samples `forward` accepts (3 slices offline, 2 realtime).
    """

    def __init__(self, sources: tp.List[str], samplerate: int, audio_channels: int, *, scale: str = "bark",
                 fbins: int = 262, fmin: float = 32.9, fmax: float = 22050.0, hidden_1: int = 50,
                 hidden_2: int = 51, realtime: bool = False, wiener_iterations: int = 1,
                 wiener_window: tp.Optional[int] = 5000):
        super().__init__(sources, samplerate, audio_channels)
        sources = self.sources
        require(scale in SCALES, f"model.scale={scale!r}: choose one of {', '.join(SCALES)}")
        require(fbins >= 2, f"model.fbins must be at least 2, got {fbins}")
        require(0 < fmin < fmax, f"model.fmin must be positive and below model.fmax={fmax:g}, got {fmin:g}")
        require(fmax <= samplerate / 2,
               f"model.fmax must be at most half the sample rate ({samplerate / 2:g} Hz), got {fmax:g}")
        require(hidden_1 >= 1 and hidden_2 >= 1,
               f"model.hidden_1 and model.hidden_2 must be positive, got {hidden_1} and {hidden_2}")
        require(wiener_iterations >= 0, f"model.wiener_iterations must be >= 0, got {wiener_iterations}")
        require(wiener_window is None or wiener_window >= 1,
               f"model.wiener_window must be a positive number of coefficients or null, got {wiener_window}")
        self.realtime = realtime
        self.wiener_iterations = wiener_iterations
        self.wiener_window = wiener_window
        self.transform = SliCQT(scale=scale, fbins=fbins, fmin=fmin, fmax=fmax, samplerate=samplerate)
        self.network = SliCQMaskNetwork(self.transform.block_shapes, len(sources), audio_channels,
                                        hidden_1, hidden_2, realtime)
        length = 1
        while self.transform.num_slices(length) < self.network.min_slices():
            length += 1
        self.min_length = length

    @property
    def lookahead(self) -> tp.Optional[int]:
        """Realtime: `slice_length + slice_support - 1` samples of the sliCQT (33862 = 768 ms by
        default); None offline (the Wiener step and the non-causal convolutions need the future).

        A mask of slice s needs slice s + 2 (:attr:`BlockCDAEStreamer.slice_lookahead`), complete
        `slice_support` samples after its start, and an output sample is final once the two slices
        over it are: the first sample of a hop waits for `2 * hop + slice_support - 1` more."""
        if not self.realtime:
            return None
        hop = self.transform.slice_length // 2
        return BlockCDAEStreamer.slice_lookahead * hop + self.transform.slice_support - 1

    def streamer(self) -> SliCQCDAEStreamer:
        """Separate a stream slice by slice (realtime only, see :class:`SliCQCDAEStreamer`)."""
        if self.lookahead is None:
            return super().streamer()  # type: ignore[return-value]
        return SliCQCDAEStreamer(self)

    def set_input_statistics(self, means: tp.Sequence[torch.Tensor], stds: tp.Sequence[torch.Tensor]) -> None:
        """Set the input normalisation from per-block, per-bin magnitude statistics [(F_b,)]."""
        for index, ((bins, _), mean, std) in enumerate(zip(self.transform.block_shapes, means, stds)):
            if mean.shape != (bins,) or std.shape != (bins,):
                raise ValueError(f"block {index}: expected statistics of shape ({bins},), got "
                                 f"{tuple(mean.shape)} and {tuple(std.shape)}")
        self.network.set_input_statistics(means, stds)

    def analyse(self, waveform: torch.Tensor) -> tp.List[torch.Tensor]:
        """(..., C, T) waveforms -> sliCQT blocks (..., C, F_b, N, T_b), complex, in float32."""
        with _full_precision(waveform):
            return self.transform(waveform.float())

    def forward(self, mixture: torch.Tensor, for_loss: bool = False
                ) -> tp.Union[torch.Tensor, tp.Tuple[tp.List[torch.Tensor], tp.List[torch.Tensor]]]:
        """Separate (B, C, T) -> (B, S, C, T); with `for_loss`, (estimates, masks) per block."""
        if mixture.dim() != 3 or mixture.shape[1] != self.audio_channels:
            raise DemixError(f"expected a mixture of shape (batch, {self.audio_channels}, time), "
                             f"got {tuple(mixture.shape)}")
        inputs, (blocks, magnitudes) = self.network_inputs(mixture)
        masks = list(self.run_network(*inputs.values()))
        estimates = self.estimate(blocks, magnitudes, masks)
        if for_loss:
            return estimates, masks
        with _full_precision(mixture):
            return self.transform.inverse(estimates, mixture.shape[-1]).to(mixture.dtype)

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Any]:
        """The sliCQT magnitudes `magnitude_<b>` (B, C, F_b, N, T_b) of every block b; the complex
        blocks and the magnitudes as context."""
        length = mixture.shape[-1]
        if length < self.min_length:
            raise DemixError(f"audio too short for the slicq_cdae model: {length} samples, need at least "
                             f"{self.min_length} ({self.network.min_slices()} slices of the sliCQT)")
        blocks = self.analyse(mixture)
        magnitudes = [block.abs() for block in blocks]
        return {f"magnitude_{index}": magnitude for index, magnitude in enumerate(magnitudes)}, (blocks, magnitudes)

    def run_network(self, *magnitudes: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        """The mask network: one (B, S, C, F_b, N, T_b) mask per block."""
        return tuple(self.network(list(magnitudes)))

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: tp.Any,
                        mixture: torch.Tensor) -> torch.Tensor:
        """Masks times the mixture, the Wiener-EM step (offline) or the mixture phase (realtime),
        and the inverse sliCQT."""
        blocks, magnitudes = context
        estimates = self.estimate(blocks, magnitudes, list(outputs))
        with _full_precision(mixture):
            return self.transform.inverse(estimates, mixture.shape[-1]).to(mixture.dtype)

    def network_axes(self) -> NetworkAxes:
        """Batch and slices of every block's magnitude and mask."""
        count = len(self.network.block_shapes)
        return NetworkAxes(inputs={f"magnitude_{index}": {0: "batch", 3: "slices"} for index in range(count)},
                           outputs={f"mask_{index}": {0: "batch", 4: "slices"} for index in range(count)})

    def estimate(self, blocks: tp.Sequence[torch.Tensor], magnitudes: tp.Sequence[torch.Tensor],
                 masks: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
        """Complex source blocks (B, S, C, F_b, N, T_b) from the mixture blocks and the masks.

        The masks multiply the (detached) mixture magnitude; offline, the result initialises
        `wiener_iterations` Wiener-EM steps on the flattened block (B, S, C, F_b, N * T_b);
        realtime, it takes the mixture phase.
        """
        estimates = []
        with _full_precision(blocks[0]):
            for block, magnitude, mask in zip(blocks, magnitudes, masks):
                target = mask.float() * magnitude.detach().unsqueeze(1)
                if self.realtime:
                    tiny = torch.finfo(magnitude.dtype).tiny
                    estimates.append(target * (block / magnitude.clamp_min(tiny)).unsqueeze(1))
                    continue
                slices, frames = block.shape[-2:]
                # eps as the reference (norbert's default, the float32 epsilon); the EM rescaling
                # is per example where the reference's is per batch (the same for one example).
                filtered = wiener(flatten_slices(target), flatten_slices(block), self.wiener_iterations,
                                  window=self.wiener_window, eps=torch.finfo(magnitude.dtype).eps)
                estimates.append(unflatten_slices(filtered, slices, frames))
        return estimates


# ------------------------------------------------------------------------------------ objective
def complex_mse(estimate: tp.Sequence[torch.Tensor], reference: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the MSE of the real and imaginary parts (|e - r|^2 / 2 averaged), as the
    reference's complex MSE on real views."""
    return torch.stack([torch.view_as_real(e - r).square().mean() for e, r in zip(estimate, reference)]).mean()


def complex_mse_per_subset(estimates: tp.Sequence[torch.Tensor], references: tp.Sequence[torch.Tensor],
                           subsets: tp.Sequence[tp.Sequence[int]]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The complex MSE (as :func:`complex_mse`) of every source subset's summed blocks, (K,), and
    of every source alone, (S,), from blocks (B, S, ...).

    A subset's summed error is the sum of its sources' errors, so its squared norm is a quadratic
    form in the (S, S) Gram matrix G of the sources' errors: sum_k |sum_{s in k} e_s|^2 =
    m_k^T G m_k. Per block: one difference and one batched product for G (no (K, ...) sums)."""
    membership = None
    per_subset, per_source = [], []
    with _full_precision(estimates[0]):  # (autocast would take the products to bf16)
        for estimate, reference in zip(estimates, references):
            difference = torch.view_as_real(estimate - reference)  # (B, S, ..., 2)
            batch, sources = difference.shape[:2]
            flat = difference.reshape(batch, sources, -1)
            gram = torch.bmm(flat, flat.transpose(1, 2)).sum(dim=0) / (batch * flat.shape[-1])  # (S, S)
            if membership is None:
                membership = subset_matrix(subsets, sources, gram.dtype, gram.device)  # (K, S)
            per_subset.append(((membership @ gram) * membership).sum(dim=1))
            per_source.append(gram.diagonal())
    return torch.stack(per_subset).mean(dim=0), torch.stack(per_source).mean(dim=0)


def mask_sum_loss(masks: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of MSE(sum of the sources' masks, 1): masks (B, S, ...) per block."""
    return torch.stack([(mask.float().sum(dim=1) - 1).square().mean() for mask in masks]).mean()


def sd_sdr_loss(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative scale-dependent SDR in dB (Le Roux et al., "SDR - half-baked or well done?", 2019),
    averaged over the (..., T) rows: -10 log10(|a s|^2 / |s' - s|^2), a = <s', s> / |s|^2, after
    removing each row's mean."""
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    alpha = (estimate * reference).sum(dim=-1) / (reference.square().sum(dim=-1) + eps)
    signal = (alpha.square() * reference.square().sum(dim=-1))
    error = (estimate - reference).square().sum(dim=-1)
    return -(10 * torch.log10(signal / (error + eps) + eps)).mean()


def build_slicq_cdae_objective(model: SliCQCDAE, *, combinations: str = "all", mask_coef: float = 1.0,
                               sdr_coef: float = 0.0, source_weights: tp.Optional[tp.Dict[str, float]] = None
                               ) -> Objective:
    """xumx-sliCQ-V2's loss: a combination loss on complex sliCQT blocks plus a mask-sum penalty.

    For every source subset K (`loss.combinations`: "all" the 2^S - 2 non-empty proper subsets,
    14 for four sources; "singles"), the complex MSE (:func:`complex_mse`, averaged over blocks)
    of the summed estimated blocks against the summed sliCQTs of the true sources; mean over K.
    Plus `mask_coef` (default 1) times MSE(sum of all sources' masks, 1) (:func:`mask_sum_loss`),
    plus, with `sdr_coef > 0` (default 0, off), `sdr_coef` times the same combination loss on the
    waveforms (inverse sliCQT) with the negative SD-SDR (:func:`sd_sdr_loss`) instead of the MSE.
    `source_weights={name: weight}` weighs a subset by the mean weight of its sources.

    Reported, detached: `loss_complex`, `loss_mask`, `loss_sdr` (when on) and `loss_<name>`, each
    source's own complex MSE.
    """
    sources = list(model.sources)
    subsets = source_subsets(len(sources), combinations)
    mask_coef = non_negative(mask_coef, "loss.mask_coef")
    sdr_coef = non_negative(sdr_coef, "loss.sdr_coef")
    weights = parse_source_weights(sources, source_weights)
    # At call time `model` may be wrapped (DDP), so the objective keeps its own reference to the
    # transform (a module without parameters) and only calls the model.
    transform = model.transform
    analyse = model.analyse
    subset_weight = None
    if source_weights is not None:
        subset_weight = torch.tensor(subset_weights(subsets, weights), device=next(model.parameters()).device)

    def objective(model: nn.Module, mixture: torch.Tensor, references: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        estimates, masks = model(mixture, for_loss=True)
        with torch.no_grad():
            targets = analyse(references)  # (B, S, C, F_b, N, T_b) per block
        per_subset, per_source = complex_mse_per_subset(estimates, targets, subsets)
        loss_complex = (per_subset * subset_weight).sum() / subset_weight.sum() if subset_weight is not None \
            else per_subset.mean()
        loss_mask = mask_sum_loss(masks)
        loss = loss_complex + mask_coef * loss_mask
        metrics = {"loss_complex": loss_complex.detach(), "loss_mask": loss_mask.detach()}
        if sdr_coef > 0:
            with _full_precision(mixture):
                waveforms = transform.inverse(estimates, references.shape[-1])
            loss_sdr = combination_loss(waveforms, references.to(waveforms.dtype), sd_sdr_loss, subsets, weights)
            metrics["loss_sdr"] = loss_sdr.detach()
            loss = loss + sdr_coef * loss_sdr
        metrics["loss"] = loss
        per_source = per_source.detach()
        for index, name in enumerate(sources):
            metrics[f"loss_{name}"] = per_source[index]
        return metrics

    return objective


# ---------------------------------------------------------------------------------- calibration
def calibrate_slicq_cdae(model: SliCQCDAE, batches: tp.Iterable[tp.Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set every block's input normalisation from training data.

    Per block and bin, the mean and std of the mixture magnitude (averaged over channels) over
    all flattened coefficients of all batches, the std floored at 1e-4 times the block's maximum
    std, as the reference's per-block `StandardScaler`s.
    """
    counts: tp.List[int] = []  # coefficients seen per block (blocks differ in T_b)
    means: tp.List[torch.Tensor] = []
    squares: tp.List[torch.Tensor] = []  # sums of squared deviations from the means
    with torch.no_grad():
        for mixture, _ in batches:
            blocks = model.analyse(mixture.to(next(model.parameters()).device))
            for index, block in enumerate(blocks):
                frames = block.abs().mean(dim=-4).double().flatten(-2)  # (B, F_b, N * T_b)
                frames = frames.transpose(-1, -2).reshape(-1, frames.shape[-2])
                batch_count = frames.shape[0]
                batch_mean = frames.mean(dim=0)
                batch_squares = ((frames - batch_mean) ** 2).sum(dim=0)
                if index == len(means):
                    counts.append(batch_count)
                    means.append(batch_mean)
                    squares.append(batch_squares)
                    continue
                # Chan et al.'s pairwise update of mean and sum of squared deviations.
                count = counts[index]
                delta = batch_mean - means[index]
                total = count + batch_count
                means[index] = means[index] + delta * batch_count / total
                squares[index] = squares[index] + batch_squares + delta ** 2 * count * batch_count / total
                counts[index] = total
    if not means:
        raise DemixError("cannot calibrate the slicq_cdae model: no training batches")
    stds = []
    for block_squares, count in zip(squares, counts):
        std = (block_squares / count).sqrt()
        if float(std.max()) == 0:
            raise DemixError("cannot calibrate the slicq_cdae model: the training mixtures are silent")
        stds.append(torch.clamp(std, min=1e-4 * float(std.max())).float())
    model.set_input_statistics([mean.float() for mean in means], stds)
    logger.info("slicq_cdae input statistics of %d blocks from %d to %d coefficients per bin",
                len(means), min(counts), max(counts))


# ------------------------------------------------------------------------ reference and export
def load_reference_state_dict(model: SliCQCDAE, state: tp.Mapping[str, torch.Tensor]) -> None:
    """Load a state dict of the reference `xumx_slicq_v2.model.Unmix` (keys `sliced_umx.<block>.*`,
    targets ordered bass, vocals, other, drums) into `model`, whose sources must be those four
    names in any order. Raises :class:`DemixError` on a mismatch (names, blocks or shapes)."""
    if sorted(model.sources) != sorted(REFERENCE_TARGETS):
        raise DemixError(f"a reference xumx-sliCQ-V2 state dict has the targets {list(REFERENCE_TARGETS)}; "
                         f"the model's sources are {model.sources}")
    order = [REFERENCE_TARGETS.index(name) for name in model.sources]
    blocks = model.network.blocks
    found = {int(key.split(".")[1]) for key in state if key.startswith("sliced_umx.")}
    if found != set(range(len(blocks))):
        raise DemixError(f"the reference state dict has {len(found)} blocks, the model {len(blocks)} "
                         "(different sliCQT settings?)")
    # Our layer <- the index of the layer in each reference target's Sequential.
    layers = {"encode1": 0, "norm1": 1, "encode2": 3, "norm2": 4, "decode2": 6, "norm3": 7, "decode1": 9}
    converted: tp.Dict[str, torch.Tensor] = {}
    by_layer: tp.Dict[str, tp.List[str]] = {}  # "sliced_umx.<b>.cdaes.<t>.<position>." -> its keys
    for key in state:
        by_layer.setdefault(key.rpartition(".")[0] + ".", []).append(key)
    try:
        for index in range(len(blocks)):
            prefix = f"sliced_umx.{index}"
            ours = f"network.blocks.{index}."
            converted[f"{ours}input_mean"] = state[f"{prefix}.input_mean"]
            converted[f"{ours}input_scale"] = state[f"{prefix}.input_scale"]
            for source, target in enumerate(order):
                for name, position in layers.items():
                    layer = f"{prefix}.cdaes.{target}.{position}."
                    if layer not in by_layer:
                        raise KeyError(f"{layer}*")
                    for key in by_layer[layer]:
                        converted[f"{ours}cdaes.{source}.{name}.{key[len(layer):]}"] = state[key]
            # One autoencoder per source, as the reference has them -> the block's grouped layers.
            blocks[index]._group_per_source_state(converted, ours)
    except KeyError as error:
        raise DemixError(f"the reference state dict misses {error.args[0]!r}") from None
    current = model.state_dict()
    for key, value in converted.items():
        if value.shape != current[key].shape:
            raise DemixError(f"reference weights do not fit {key}: shape {tuple(value.shape)}, "
                             f"expected {tuple(current[key].shape)} (different sliCQT or channels?)")
    current.update(converted)
    model.load_state_dict(current, strict=True)


class _MaskExport(nn.Module):
    """The mask network with one positional tensor per block, for ONNX export."""

    def __init__(self, network: SliCQMaskNetwork):
        super().__init__()
        self.network = network

    def forward(self, *magnitudes: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        return tuple(self.network(list(magnitudes)))


def export_onnx(model: SliCQCDAE, path: tp.Union[str, Path], slices: int = 8, opset: int = 18) -> None:
    """Export the network part of `model` (block magnitudes in, masks out) to ONNX, atomically.

    Inputs `magnitude_<b>` (B, C, F_b, N, T_b) and outputs `mask_<b>` (B, S, C, F_b, N, T_b), one
    per block b, with dynamic batch B and slice count N (at least `model.network.min_slices()`).
    The sliCQT, the Wiener step and the inverse stay in the host program. The model is exported
    in eval mode (BatchNorm with its running statistics) and left in its previous mode.
    It uses torch's TorchScript-tracing exporter (`dynamo=False`): the torch.export-based one
    gives the same graph but took minutes instead of seconds even for a 9-block network.
    """
    network = model.network
    channels = model.audio_channels
    examples = tuple(torch.rand(1, channels, bins, max(slices, network.min_slices()), frames)
                     for bins, frames in network.block_shapes)
    names = [f"magnitude_{index}" for index in range(len(examples))]
    outputs = [f"mask_{index}" for index in range(len(examples))]
    dynamic = {name: {0: "batch", 3: "slices"} for name in names}
    dynamic.update({name: {0: "batch", 4: "slices"} for name in outputs})
    was_training = network.training
    network.eval()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # The shape checks of the blocks are traced as constants; the axes stay dynamic.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(_MaskExport(network), examples, str(tmp), input_names=names, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    finally:
        network.train(was_training)

