"""The inference kernels of the demucs layers (demixlab.models.demucs.inference) against the
declared layers: the same outputs within float rounding, and only without autograd."""
import pytest
import torch
from torch import nn

from demixlab.models.demucs import inference
from demixlab.models.demucs.htdemucs import HTDemucs

CONVS = {
    "pointwise_1d_batch": (nn.Conv1d(6, 96, 1), (512, 6, 40), inference.pointwise_conv),
    "pointwise_2d": (nn.Conv2d(48, 96, 1), (1, 48, 16, 30), inference.pointwise_conv),
    "pointwise_no_bias": (nn.Conv1d(5, 7, 1, bias=False), (2, 5, 33), inference.pointwise_conv),
    "dilated_3": (nn.Conv1d(48, 6, 3, dilation=2, padding=2), (64, 48, 37), inference.same_conv1d),
    "dilated_wider_than_signal": (nn.Conv1d(8, 4, 3, dilation=8, padding=8), (3, 8, 6), inference.same_conv1d),
    "context_3": (nn.Conv1d(16, 32, 3, padding=1), (1, 16, 50), inference.same_conv1d),
    "strided_1d": (nn.Conv1d(2, 48, 8, 4, 2), (1, 2, 1003), inference.strided_conv),
    "strided_2d": (nn.Conv2d(48, 96, (8, 1), (4, 1), (2, 0)), (2, 48, 64, 9), inference.strided_conv),
    "strided_kernel_equals_stride": (nn.Conv2d(4, 8, (4, 1), (4, 1)), (1, 4, 17, 5), inference.strided_conv),
    "transposed_1d": (nn.ConvTranspose1d(48, 8, 8, 4), (1, 48, 251), inference.strided_conv_transpose),
    "transposed_2d": (nn.ConvTranspose2d(96, 48, (8, 1), (4, 1)), (2, 96, 16, 7), inference.strided_conv_transpose),
    "transposed_three_taps": (nn.ConvTranspose2d(6, 5, (6, 1), (2, 1), bias=False), (1, 6, 9, 4),
                              inference.strided_conv_transpose),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_each_kernel_computes_its_convolution(case):
    conv, shape, kernel = CONVS[case]
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        assert inference._kernel_for(conv) is kernel
        expected = conv(x)
        out = inference.convolve(conv, x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_other_convolutions_and_autograd_keep_the_declared_layer():
    assert inference._kernel_for(nn.Conv2d(4, 8, 3, padding=1)) is None  # 3x3: oneDNN is fine
    assert inference._kernel_for(nn.Conv1d(4, 8, 8, 4, groups=2)) is None
    assert inference._kernel_for(nn.Conv1d(4, 8, 4, 1)) is None  # even kernel, no padding: not "same"
    conv = nn.Conv1d(2, 4, 8, 4)
    x = torch.randn(1, 2, 64, requires_grad=True)
    out = inference.convolve(conv, x)
    assert out.grad_fn is not None and "Convolution" in type(out.grad_fn).__name__


@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_through_sdpa_matches_multihead_attention(self_attention):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    query = torch.randn(2, 50, 32)
    key = query if self_attention else torch.randn(2, 23, 32)
    with torch.no_grad():
        expected = mha(query, key, key, need_weights=False)[0]
        out = inference.attention(mha, query, key)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_htdemucs_inference_matches_its_declared_layers():
    torch.manual_seed(0)
    model = HTDemucs(["drums", "bass", "other", "vocals"], channels=8, nfft=1024, depth=3, segment=0.4,
                     bottom_channels=16, dconv_mode=3, t_layers=2, t_heads=4).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # LayerScales far from their small initial values
            parameter.add_(0.05 * torch.randn_like(parameter))
    mixture = 0.3 * torch.randn(2, 2, 15000)
    with torch.no_grad():
        fast = model(mixture)
    declared = model(mixture).detach()  # with autograd: the declared layers
    assert (fast - declared).abs().max() <= 1e-5 * declared.abs().max()


def test_frequency_rows_in_tiles_match_all_rows_at_once():
    from demixlab.models.demucs.blocks import DConv

    torch.manual_seed(0)
    dconv = DConv(8, compress=2, init=0.5).eval()
    y = torch.randn(2, 8, 13, 20)
    with torch.no_grad():
        expected = dconv(y.permute(0, 2, 1, 3).reshape(26, 8, 20)).view(2, 13, 8, 20).permute(0, 2, 1, 3)
        out = inference.per_row_in_tiles(dconv, y, tile_bytes=5 * 2 * 8 * 20 * 4)  # 5 rows a tile: 5, 5, 3
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("affine", [True, False])
def test_token_group_norm_matches_group_norm_of_the_transposed_tokens(affine):
    torch.manual_seed(0)
    norm = nn.GroupNorm(1, 16, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    x = 3 + 2 * torch.randn(2, 40, 16)
    with torch.no_grad():
        expected = norm(x.transpose(1, 2)).transpose(1, 2)
        out = inference.token_group_norm(norm, x)
    assert out.is_contiguous()
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
