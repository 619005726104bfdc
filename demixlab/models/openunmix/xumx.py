"""CrossNet-Open-Unmix (X-UMX, Sawata et al., "All for one and one for all: improving music
separation by bridging networks", ICASSP 2021).

X-UMX is Open-Unmix with its target networks joined by two bridging averages and trained with a
combination loss over source subsets in two domains. It adds no parameters: the targets are
:class:`~demixlab.models.openunmix.umx.OpenUnmixTarget` networks, with the same state-dict keys as UMX's,
and inference (Wiener EM, inverse STFT) is UMX's.
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError
from ...spectral import STFT
from ..losses import Objective, combination_loss, non_negative, parse_source_weights, source_subsets, weighted_sdr_loss
from .umx import UMX


class XUMX(UMX):
    """X-UMX: one Open-Unmix network per source, bridged.

    Bridge 1: the encoder outputs tanh(bn1(fc1(x))) of all targets are averaged and the average
    feeds every target's LSTM. Bridge 2: the skip-connected outputs concat(features, lstm) of all
    targets are averaged and the average feeds every target's decoder (fc2 onwards). With
    `bridge=False` both averages are skipped and the model is exactly :class:`UMX`.

    Options, layouts and `forward` are :class:`UMX`'s. `residual` is rejected: the bridges and the
    combination loss assume a network (and a trained estimate) for every source.
    """

    def __init__(self, sources: tp.List[str], samplerate: int, audio_channels: int, *, n_fft: int = 4096,
                 hop_length: int = 1024, hidden_size: int = 512, nb_layers: int = 3, unidirectional: bool = False,
                 bandwidth: float = 16000.0, wiener_iterations: int = 1, wiener_window: tp.Optional[int] = 300,
                 softmask: bool = False, residual: bool = False, bridge: bool = True):
        if residual:
            raise DemixError("model.residual is not supported by the xumx family: every source needs its own "
                             "bridged network; set model.residual=false")
        super().__init__(sources, samplerate, audio_channels, n_fft=n_fft, hop_length=hop_length,
                         hidden_size=hidden_size, nb_layers=nb_layers, unidirectional=unidirectional,
                         bandwidth=bandwidth, wiener_iterations=wiener_iterations, wiener_window=wiener_window,
                         softmask=softmask)
        self.bridge = bridge

    def target_magnitudes(self, mix_magnitude: torch.Tensor) -> torch.Tensor:
        """Mixture magnitude (B, C, F, N) -> source magnitude estimates (B, S, C, F, N)."""
        targets = list(self.targets.values())
        features = self._cross([target.encode(mix_magnitude) for target in targets])
        # Each target's concat(features, lstm) starts with the shared average when bridged, so
        # averaging them is the published average of concat(own features, lstm(average)).
        features = self._cross([target.temporal(x) for target, x in zip(targets, features)])
        return torch.stack([target.decode(x, mix_magnitude) for target, x in zip(targets, features)], dim=1)

    def streamed_magnitudes(self, mix_magnitude: torch.Tensor, states: tp.Optional[tp.List[tp.Any]]
                            ) -> tp.Tuple[torch.Tensor, tp.List[tp.Any]]:
        """:meth:`target_magnitudes` of the next frames of a stream, the LSTMs continuing from
        `states` (None at the start); returns the new states too. The bridges are frame-local."""
        targets = list(self.targets.values())
        states = states or [None] * len(targets)
        features = self._cross([target.encode(mix_magnitude, fold=False) for target in targets])
        steps = [target.temporal_step(x, state) for target, x, state in zip(targets, features, states)]
        features = self._cross([x for x, _ in steps])
        estimates = torch.stack([target.decode(x, mix_magnitude, fold=False) for target, x in zip(targets, features)],
                                dim=1)
        return estimates, [state for _, state in steps]

    def _cross(self, features: tp.List[torch.Tensor]) -> tp.List[torch.Tensor]:
        """A bridge: every target gets the average of the targets' features (unchanged without `bridge`)."""
        if not self.bridge:
            return features
        average = torch.stack(features).mean(dim=0)
        return [average] * len(features)


def build_xumx_objective(model: XUMX, *, combinations: str = "all", mix_coef: float = 10.0,
                         source_weights: tp.Optional[tp.Dict[str, float]] = None) -> Objective:
    """X-UMX's multi-domain combination loss, as in Sony's and asteroid's reference recipes.

    With Y_s the estimated magnitudes (mask times mixture magnitude), |S_s| the true ones, y_s the
    estimated waveforms (inverse STFT of Y_s with the phase of the mixture STFT), s_s the true
    waveforms and x = sum of all s_s, for every source subset K (`loss.combinations`: "all" the
    2^S - 2 non-empty proper subsets, 14 for four sources; "singles" each source alone):

        freq_K = MSE(sum_K Y_s, sum_K |S_s|)            (a sum of magnitudes, not |sum|)
        time_K = wSDR(sum_K y_s, sum_K s_s, mixture x)  (Choi et al., see weighted_sdr_loss)

    `loss = mean_K freq_K + mix_coef * (1 + mean_K time_K)` (`loss.mix_coef`, default 10), zero
    for a perfect estimate. MSE and wSDR average over batch, channels (and bins, frames or
    samples); each wSDR row is one channel of one example. `loss.source_weights={name: weight}`
    weighs a subset by the mean weight of its sources (all 1 by default: the published loss).
    `mix_coef=0` skips the time-domain term (frequency-domain combination loss only).

    The references (Sony's nnabla code and asteroid's egs/musdb18/X-UMX recipe) agree on all of
    this; Sony takes x as the input mixture, asteroid as the sum of the targets (the same thing in
    training). One deliberate difference: the estimated waveforms have the exact input length,
    where the references crop all signals to the inverse STFT's (N - 1) * hop samples.
    `combinations="singles"`, `mix_coef` other than 10 and `source_weights` are extensions.

    Reported next to `loss`, detached: `loss_freq`, `loss_time` (the 1 + wSDR term, when
    computed) and `loss_<name>`, each source's own magnitude MSE (UMX's `loss_<name>`).
    """
    sources = list(model.sources)
    subsets = source_subsets(len(sources), combinations)
    mix_coef = non_negative(mix_coef, "loss.mix_coef")
    weights = parse_source_weights(sources, source_weights)
    # Our own STFT (same settings): at call time `model` may be wrapped (DDP), so only call it.
    stft = STFT(model.stft.n_fft, model.stft.hop_length)

    def objective(model: nn.Module, mixture: torch.Tensor, references: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        magnitudes = model(mixture, for_loss=True)  # (B, S, C, F, N)
        with torch.no_grad():
            target_magnitudes = stft(references).abs()
        loss_freq = combination_loss(magnitudes, target_magnitudes, F.mse_loss, subsets, weights)
        metrics = {"loss_freq": loss_freq.detach()}
        loss = loss_freq
        if mix_coef > 0:
            with torch.no_grad():
                mix_stft = stft(mixture)
                # exp(i * phase of the mixture), 0 in silent bins (where the estimate is 0 too).
                phase = (mix_stft / mix_stft.abs().clamp_min(torch.finfo(mix_stft.real.dtype).tiny)).unsqueeze(1)
            estimates = stft.inverse(magnitudes * phase, length=references.shape[-1])
            total = references.sum(dim=1)
            loss_time = 1 + combination_loss(
                estimates, references, lambda estimate, reference: weighted_sdr_loss(estimate, reference, total),
                subsets, weights)
            metrics["loss_time"] = loss_time.detach()
            loss = loss + mix_coef * loss_time
        metrics["loss"] = loss
        with torch.no_grad():
            errors = ((magnitudes - target_magnitudes) ** 2).mean(dim=(0, 2, 3, 4))
        for index, name in enumerate(sources):
            metrics[f"loss_{name}"] = errors[index]
        return metrics

    return objective

