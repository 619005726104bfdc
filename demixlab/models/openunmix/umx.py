"""Open-Unmix (Stöter et al. 2019): one spectrogram-masking network per source.

Each target network maps the mixture magnitude spectrogram to a source magnitude estimate
(a non-negative mask times the mixture). At inference the estimates drive a multichannel
Wiener filter on the mixture STFT, followed by the inverse STFT.

Layouts: waveforms (B, C, T) and (B, S, C, T); spectrograms (B, C, F, N) and (B, S, C, F, N),
with F = n_fft // 2 + 1 bins and N = T // hop_length + 1 frames.

With `residual=True` the last name in `sources` gets no network: it is estimated as the
mixture minus the other sources (see :class:`UMX`).
"""
import logging
import typing as tp
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError
from ...threads import map_in_threads
from ...spectral import STFT, bandwidth_to_max_bin, bins_contiguous, wiener
from ...spectral.stft import StreamingISTFT, StreamingSTFT
from ..contract import ModelStreamer, NetworkAxes, SeparationModel, require
from ..losses import Objective, parse_source_weights

logger = logging.getLogger(__name__)

# Keys that old Open-Unmix checkpoints carry next to the network weights.
_REFERENCE_EXTRA_KEYS = ("stft.window", "transform.0.window", "sample_rate")


class OpenUnmixTarget(nn.Module):
    """The Open-Unmix network of one target.

    Its state dict has exactly the keys of `openunmix.model.OpenUnmix`, so published target
    weights load with `strict=True` (after :func:`clean_reference_state`).

    Args:
        nb_bins: frequency bins F of the spectrograms (n_fft // 2 + 1).
        nb_channels: audio channels C.
        hidden_size: width of the bottleneck layers.
        nb_layers: LSTM layers.
        unidirectional: causal LSTM of `hidden_size` units instead of a bidirectional one
            of `hidden_size // 2` units per direction.
        max_bin: bins seen by the network (the output always covers all `nb_bins`).
    """

    def __init__(self, nb_bins: int = 2049, nb_channels: int = 2, hidden_size: int = 512, nb_layers: int = 3,
                 unidirectional: bool = False, max_bin: tp.Optional[int] = None):
        super().__init__()
        self.nb_bins = nb_bins
        self.max_bin = max_bin or nb_bins
        self.nb_channels = nb_channels
        self.hidden_size = hidden_size

        # Input normalisation: x -> (x + input_mean) * input_scale, so input_mean holds the
        # negated data mean and input_scale its reciprocal std (see `set_input_statistics`).
        self.input_mean = nn.Parameter(torch.zeros(self.max_bin))
        self.input_scale = nn.Parameter(torch.ones(self.max_bin))
        self.output_scale = nn.Parameter(torch.ones(nb_bins))
        self.output_mean = nn.Parameter(torch.ones(nb_bins))

        self.fc1 = nn.Linear(nb_channels * self.max_bin, hidden_size, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden_size)
        self.lstm = nn.LSTM(
            input_size=hidden_size,
            hidden_size=hidden_size if unidirectional else hidden_size // 2,
            num_layers=nb_layers,
            bidirectional=not unidirectional,
            batch_first=True,
            dropout=0.4 if nb_layers > 1 else 0.0,
        )
        self.fc2 = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden_size)
        self.fc3 = nn.Linear(hidden_size, nb_channels * nb_bins, bias=False)
        self.bn3 = nn.BatchNorm1d(nb_channels * nb_bins)

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalise inputs with per-bin statistics of shape (nb_bins,) (cropped to max_bin)."""
        with torch.no_grad():
            self.input_mean.copy_(-mean[:self.max_bin])
            self.input_scale.copy_(1.0 / std[:self.max_bin])

    def forward(self, mix_magnitude: torch.Tensor, out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mixture magnitude (B, C, F, N) -> estimated target magnitude (B, C, F, N), written into
        `out` if given."""
        return self.decode(self.temporal(self.encode(mix_magnitude)), mix_magnitude, out=out)

    def _folded(self, fold: bool) -> tp.Optional[tp.Dict[str, torch.Tensor]]:
        """With `fold`, in inference (eval mode, no autograd): the input normalisation folded into
        fc1 and bn3 with the output scaling folded into fc3, as weights and biases of one affine
        map each (the same function, one product instead of four passes over the activations);
        None otherwise. Computed on every call (a few ms at full size): a cache keyed on the
        parameters' versions let validation use stale folded weights after the solver swapped
        weights in (the exact-resume tests caught it). Exports and compiled graphs keep the
        layers as they are."""
        if not fold or self.training or torch.is_grad_enabled() or _recording_a_graph():
            return None
        channels = self.nb_channels
        # fc1((x + m) * s) = (W diag(s)) x + W (m * s), s and m per bin, repeated for each channel.
        input_scale = self.input_scale.repeat(channels)
        folded = {"fc1_weight": self.fc1.weight * input_scale,
                  "fc1_bias": self.fc1.weight @ (self.input_mean.repeat(channels) * input_scale)}
        # bn3(y) * o_s + o_m = y * a + c per output feature (channel-major, as fc3's outputs).
        bn3 = self.bn3
        gain = bn3.weight / torch.sqrt(bn3.running_var + bn3.eps)
        output_scale = self.output_scale.repeat(channels)
        bias = (bn3.bias - bn3.running_mean * gain) * output_scale + self.output_mean.repeat(channels)
        # [weight | bias], (C * F, hidden_size + 1), for features with a column of ones appended.
        folded["fc3_augmented"] = torch.cat([self.fc3.weight * (gain * output_scale)[:, None], bias[:, None]], dim=1)
        return folded

    # The three stages of `forward`, public so that X-UMX can bridge targets between them.
    def encode(self, mix_magnitude: torch.Tensor, fold: bool = True) -> torch.Tensor:
        """Mixture magnitude (B, C, F, N) -> frame features (B, N, hidden_size) in [-1, 1]:
        the normalised frames below `max_bin` through fc1, bn1 and tanh (`fold`: see
        :meth:`_folded`; streams of a few frames per call pass False)."""
        batch, channels, _, frames = mix_magnitude.shape
        # Frame vectors: (B, N, C, max_bin), flattened to (B * N, C * max_bin) for the dense layers.
        x = mix_magnitude[:, :, :self.max_bin].permute(0, 3, 1, 2)
        folded = self._folded(fold)
        if folded is None:
            x = (x + self.input_mean) * self.input_scale
            x = self.fc1(x.reshape(batch * frames, channels * self.max_bin))
        else:
            x = torch.addmm(folded["fc1_bias"], x.reshape(batch * frames, channels * self.max_bin),
                            folded["fc1_weight"].t())
        return torch.tanh(self.bn1(x)).reshape(batch, frames, self.hidden_size)

    def temporal(self, features: torch.Tensor) -> torch.Tensor:
        """Frame features (B, N, hidden_size) -> (B, N, 2 * hidden_size): the features next to
        the LSTM's output (the skip connection)."""
        recurrent, _ = self.lstm(features)
        return torch.cat([features, recurrent], dim=-1)

    def temporal_step(self, features: torch.Tensor, state: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]]
                      ) -> tp.Tuple[torch.Tensor, tp.Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`temporal` of the next frames of a sequence, continuing from the LSTM `state` (None
        at the start); returns the new state too. Only a unidirectional LSTM can continue."""
        recurrent, state = self.lstm(features, state)
        return torch.cat([features, recurrent], dim=-1), state

    def decode(self, features: torch.Tensor, mix_magnitude: torch.Tensor,
               out: tp.Optional[torch.Tensor] = None, fold: bool = True) -> torch.Tensor:
        """Features (B, N, 2 * hidden_size) -> target magnitude (B, C, F, N): fc2/bn2/relu and
        fc3/bn3 give a non-negative mask (after output scaling) that multiplies the mixture.
        The result is written into `out` if given (not differentiable then); `fold` as in
        :meth:`encode`."""
        batch, channels, bins, frames = mix_magnitude.shape
        x = features.reshape(batch * frames, 2 * self.hidden_size)
        x = F.relu(self.bn2(self.fc2(x)))
        folded = self._folded(fold)
        if folded is None:
            x = self.bn3(self.fc3(x)).reshape(batch, frames, channels, bins)
            mask = F.relu(x * self.output_scale + self.output_mean).permute(0, 2, 3, 1)
        else:
            # The product taken transposed gives the mask in the mixture's (B, C, F, N) layout, and
            # fc3's bias rides on a column of ones: no transposing copy, no pass over it but relu.
            ones = x.new_ones(batch * frames, 1)
            x = torch.cat([x, ones], dim=1).reshape(batch, frames, self.hidden_size + 1)
            mask = F.relu(folded["fc3_augmented"] @ x.transpose(1, 2), inplace=True)
            mask = mask.reshape(batch, channels, bins, frames)
        # The mask multiplies the mixture, whose gradient is not followed.
        if out is not None:
            return torch.mul(mask, mix_magnitude.detach(), out=out)
        return mask * mix_magnitude.detach()


def _recording_a_graph() -> bool:
    """Whether torch is tracing, exporting or compiling the call (which must see plain layers and
    no writes into preallocated outputs)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def clean_reference_state(state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """Drop the non-network entries (STFT window, sample rate) that old Open-Unmix target
    checkpoints carry, so the rest loads into :class:`OpenUnmixTarget` with `strict=True`."""
    return {key: value for key, value in state.items() if key not in _REFERENCE_EXTRA_KEYS}


class UMX(SeparationModel):
    """Open-Unmix separation model: one :class:`OpenUnmixTarget` per source, trained together.

    `forward(mixture)` separates (B, C, T) waveforms into (B, S, C, T) waveforms (S in `sources`
    order) by multichannel Wiener filtering of the mixture STFT; `forward(mixture, for_loss=True)`
    returns the magnitude estimates (B, S, C, F, N) that the objective compares to the sources'.

    With `residual=True` the last source has no network: its estimate is the mixture minus the
    others, taken before the Wiener EM iterations (so EM still models it as a source). Its
    magnitude in the `for_loss` output is `| |X| - sum of the other estimates |` (the residual
    with the mixture phase) and it is left out of the training loss.

    The window of `wiener_window` frames bounds memory on long tracks; each window gets its own
    spatial model (as in Open-Unmix), so it affects the output when `wiener_iterations > 0`.
    The Wiener filter runs in the mixture's dtype: pass float64 audio for double precision.
    """

    def __init__(self, sources: tp.List[str], samplerate: int, audio_channels: int, *, n_fft: int = 4096,
                 hop_length: int = 1024, hidden_size: int = 512, nb_layers: int = 3, unidirectional: bool = False,
                 bandwidth: float = 16000.0, wiener_iterations: int = 1, wiener_window: tp.Optional[int] = 300,
                 softmask: bool = False, residual: bool = False):
        super().__init__(sources, samplerate, audio_channels)
        sources = self.sources
        require(n_fft >= 2, f"model.n_fft must be at least 2, got {n_fft}")
        require(0 < hop_length <= n_fft, f"model.hop_length must be in [1, model.n_fft={n_fft}], got {hop_length}")
        require(hidden_size >= 1, f"model.hidden_size must be positive, got {hidden_size}")
        require(unidirectional or hidden_size % 2 == 0,
               f"model.hidden_size must be even with a bidirectional LSTM, got {hidden_size}")
        require(nb_layers >= 1, f"model.nb_layers must be at least 1, got {nb_layers}")
        require(0 < bandwidth <= samplerate / 2,
               f"model.bandwidth must be in (0, {samplerate / 2:g}] Hz (half the sample rate), got {bandwidth:g}")
        require(wiener_iterations >= 0, f"model.wiener_iterations must be >= 0, got {wiener_iterations}")
        require(wiener_window is None or wiener_window >= 1,
               f"model.wiener_window must be a positive number of frames or null, got {wiener_window}")
        require(not residual or len(sources) >= 2,
               f"model.residual needs at least two sources (the last one is the residual), got {sources}")

        self.wiener_iterations = wiener_iterations
        self.wiener_window = wiener_window
        self.softmask = softmask
        self.residual = residual
        # Sources with a network, in `sources` order (all but the last with `residual`).
        self.network_sources = sources[:-1] if residual else list(sources)

        self.stft = STFT(n_fft, hop_length)
        self.nb_bins = self.stft.nb_bins
        self.max_bin = bandwidth_to_max_bin(samplerate, n_fft, bandwidth)
        self.targets = nn.ModuleDict({
            name: OpenUnmixTarget(nb_bins=self.nb_bins, nb_channels=audio_channels, hidden_size=hidden_size,
                                  nb_layers=nb_layers, unidirectional=unidirectional, max_bin=self.max_bin)
            for name in self.network_sources
        })

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set every target's input normalisation from per-bin mixture magnitude statistics (F,)."""
        if mean.shape != (self.nb_bins,) or std.shape != (self.nb_bins,):
            raise ValueError(f"expected statistics of shape ({self.nb_bins},), got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        for target in self.targets.values():
            target.set_input_statistics(mean, std)

    def target_magnitudes(self, mix_magnitude: torch.Tensor) -> torch.Tensor:
        """Mixture magnitude (B, C, F, N) -> the estimates of the networked sources (B, S', C, F, N).

        Inference on CPU runs the target networks side by side on torch's threads, one intra-op
        thread each (a batch-1 LSTM keeps one core busy at best); the same estimates as in turn."""
        targets = list(self.targets.values())
        if torch.is_grad_enabled() or mix_magnitude.device.type != "cpu" or _recording_a_graph():
            return torch.stack([target(mix_magnitude) for target in targets], dim=1)
        estimates = mix_magnitude.new_empty(mix_magnitude.shape[0], len(targets), *mix_magnitude.shape[1:])
        map_in_threads(lambda index: targets[index](mix_magnitude, out=estimates[:, index]), range(len(targets)))
        return estimates

    def streamed_magnitudes(self, mix_magnitude: torch.Tensor, states: tp.Optional[tp.List[tp.Any]]
                            ) -> tp.Tuple[torch.Tensor, tp.List[tp.Any]]:
        """:meth:`target_magnitudes` of the next frames of a stream, continuing every target's
        LSTM from `states` (None at the start); returns the new states too."""
        targets = list(self.targets.values())
        states = states or [None] * len(targets)
        outputs, new_states = [], []
        for target, state in zip(targets, states):
            features, state = target.temporal_step(target.encode(mix_magnitude, fold=False), state)
            outputs.append(target.decode(features, mix_magnitude, fold=False))
            new_states.append(state)
        return torch.stack(outputs, dim=1), new_states

    @property
    def parallel_chunks(self) -> bool:
        """False: the forward pass runs its target networks and Wiener tiles side by side itself
        (chunks side by side would hold several 30 s chunks' spectrograms for no gain)."""
        return False

    @property
    def lookahead(self) -> tp.Optional[int]:
        """`n_fft - 1` samples (the STFT frames) with a unidirectional LSTM and a frame-local
        filter (`wiener_iterations=0`); None otherwise (a bidirectional LSTM or EM over a window
        of frames needs the future)."""
        causal = all(not target.lstm.bidirectional for target in self.targets.values())
        return self.stft.n_fft - 1 if causal and self.wiener_iterations == 0 else None

    def streamer(self) -> "UMXStreamer":
        """Separate a stream frame by frame (see :class:`UMXStreamer`)."""
        if self.lookahead is None:
            return super().streamer()  # type: ignore[return-value]
        return UMXStreamer(self)

    def forward(self, mixture: torch.Tensor, for_loss: bool = False) -> torch.Tensor:
        """Separate (B, C, T) -> (B, S, C, T); with `for_loss`, magnitudes (B, S, C, F, N)."""
        inputs, mix_stft = self.network_inputs(mixture)
        estimates, = self.run_network(*inputs.values())
        if for_loss:
            if self.residual:
                rest = (inputs["magnitude"] - estimates.sum(dim=1)).abs()
                estimates = torch.cat([estimates, rest.unsqueeze(1)], dim=1)
            return estimates
        return self.network_outputs((estimates,), mix_stft, mixture)

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], torch.Tensor]:
        """The mixture STFT's magnitude (B, C, F, N) for the networks; the complex STFT as context."""
        mix_stft = self.stft(mixture)
        return {"magnitude": mix_stft.abs()}, mix_stft

    def run_network(self, *inputs: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        """The target networks: mixture magnitude -> (B, S', C, F, N) magnitude estimates."""
        return (self.target_magnitudes(inputs[0]),)

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: torch.Tensor,
                        mixture: torch.Tensor) -> torch.Tensor:
        """The multichannel Wiener filter on the mixture STFT (`context`), then the inverse STFT."""
        batch, count, _, bins, frames = outputs[0].shape
        # The filter writes the source STFTs with contiguous bins, the order the inverse STFT reads.
        layout = bins_contiguous((batch, count + self.residual, context.shape[1], bins, frames), context)
        source_stfts = wiener(outputs[0], context, self.wiener_iterations, softmask=self.softmask,
                              residual=self.residual, window=self.wiener_window, out=layout)
        return self.stft.inverse(source_stfts, length=mixture.shape[-1])

    def network_axes(self) -> NetworkAxes:
        """Batch and frames of the magnitudes in and out."""
        return NetworkAxes(inputs={"magnitude": {0: "batch", 3: "frames"}},
                           outputs={"estimates": {0: "batch", 4: "frames"}})


class UMXStreamer(ModelStreamer):
    """A causal UMX/X-UMX (see :attr:`UMX.lookahead`) on a stream: the STFT frames each block
    completes run through the networks (the LSTMs carry their state), the frame-local filter and
    the overlap-add of the inverse STFT, which returns the samples no later frame changes."""

    def __init__(self, model: UMX):
        self.model = model
        self.analysis = StreamingSTFT(model.stft)
        self.synthesis = StreamingISTFT(model.stft)
        self.states: tp.Optional[tp.List[tp.Any]] = None
        self.length = 0

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add a (B, C, n) block; return the stem samples it completes (B, S, C, m)."""
        self.length += block.shape[-1]
        return self._separate(self.analysis.push(block))

    def finish(self) -> torch.Tensor:
        """The remaining stem samples (the end of the signal is reflected, as the STFT pads it)."""
        last = self._separate(self.analysis.finish())
        return torch.cat([last, self.synthesis.finish(self.length)], dim=-1)

    def _separate(self, mix_stft: torch.Tensor) -> torch.Tensor:
        """The stem samples that the next STFT frames (B, C, F, m) complete."""
        # oneDNN's LSTM re-packs the weights on every call: ~7 ms per layer for the one or two frames of
        # a block, against about one for ATen's own kernels (torch warns about TF32 on every switch).
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                return self._separate_frames(mix_stft)

    def _separate_frames(self, mix_stft: torch.Tensor) -> torch.Tensor:
        model = self.model
        if mix_stft.shape[-1] == 0:
            stems = mix_stft.new_zeros(mix_stft.shape[0], len(model.sources), *mix_stft.shape[1:])
        else:
            magnitudes, self.states = model.streamed_magnitudes(mix_stft.abs(), self.states)
            stems = wiener(magnitudes, mix_stft, 0, softmask=model.softmask, residual=model.residual)
        return self.synthesis.push(stems)


def build_umx_objective(model: UMX, *, source_weights: tp.Optional[tp.Dict[str, float]] = None) -> Objective:
    """Open-Unmix's objective: mean squared error between estimated and true source magnitudes.

    `loss` is the mean over the networked sources of each source's MSE (a weighted mean with
    `source_weights={name: weight}`, missing names weighing 1). Each source's MSE is also
    reported, detached, as `loss_<name>` (including a residual source, which is not trained).
    """
    weights = _network_source_weights(model, source_weights)
    sources = list(model.sources)
    trained = [sources.index(name) for name in model.network_sources]
    # Our own STFT (same settings): at call time `model` may be wrapped (DDP), so only call it.
    stft = STFT(model.stft.n_fft, model.stft.hop_length)

    def objective(model: nn.Module, mixture: torch.Tensor, references: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        estimates = model(mixture, for_loss=True)
        with torch.no_grad():
            targets = stft(references).abs()
        errors = ((estimates - targets) ** 2).mean(dim=(0, 2, 3, 4))  # (S,)
        weight = torch.tensor(weights, dtype=errors.dtype, device=errors.device)
        loss = (errors[trained] * weight).sum() / weight.sum()
        metrics = {"loss": loss}
        for index, name in enumerate(sources):
            metrics[f"loss_{name}"] = errors[index].detach()
        return metrics

    return objective


def _network_source_weights(model: UMX, weights: tp.Optional[tp.Mapping[str, float]]) -> tp.List[float]:
    """Weights of the networked sources, in order (a residual source has no network to weight)."""
    residual = [name for name in (weights or {}) if name in model.sources and name not in model.network_sources]
    if residual:
        raise DemixError(f"loss.source_weights: {residual[0]!r} is the residual source (model.residual), "
                         "it has no network to weight")
    all_weights = parse_source_weights(model.sources, weights)
    networked = [all_weights[model.sources.index(name)] for name in model.network_sources]
    if sum(networked) <= 0:
        raise DemixError("loss.source_weights: at least one source must have a positive weight")
    return networked


def calibrate_umx(model: UMX, batches: tp.Iterable[tp.Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set the input normalisation of every target from training data.

    Per-bin mean and std of the mixture magnitude (averaged over channels) over all frames of
    all batches, the std floored at 1e-4 times its maximum, as Open-Unmix's `get_statistics`.
    """
    count = 0
    mean: tp.Optional[torch.Tensor] = None
    sum_squares: tp.Optional[torch.Tensor] = None  # sum of squared deviations from `mean`
    with torch.no_grad():
        for mixture, _ in batches:
            frames = model.stft(mixture).abs().mean(dim=-3).double()  # (B, F, N)
            frames = frames.transpose(-1, -2).reshape(-1, frames.shape[-2])
            batch_count = frames.shape[0]
            batch_mean = frames.mean(dim=0)
            batch_squares = ((frames - batch_mean) ** 2).sum(dim=0)
            if mean is None or sum_squares is None:
                mean, sum_squares = batch_mean, batch_squares
            else:
                # Chan et al.'s pairwise update of mean and sum of squared deviations.
                delta = batch_mean - mean
                total = count + batch_count
                mean = mean + delta * batch_count / total
                sum_squares = sum_squares + batch_squares + delta ** 2 * count * batch_count / total
            count += batch_count
    if mean is None or sum_squares is None or count == 0:
        raise DemixError("cannot calibrate the umx model: no training batches")
    std = (sum_squares / count).sqrt()
    if float(std.max()) == 0:
        raise DemixError("cannot calibrate the umx model: the training mixtures are silent")
    std = torch.clamp(std, min=1e-4 * float(std.max()))
    model.set_input_statistics(mean, std)
    logger.info("umx input statistics from %d frames: mean magnitude %.4g, mean std %.4g",
                count, float(mean.mean()), float(std.mean()))

