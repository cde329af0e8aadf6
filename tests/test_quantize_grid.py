"""genforge.quantize.grid: the INT8 and INT4 round-to-nearest grids every integer format uses."""

from __future__ import annotations

import pytest
import torch

from genforge.quantize.grid import (
    GridError,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.rand(48, 1) * 3
    weight[5] = 0  # a zero row stays zero
    grid = quantize_int8(weight)
    assert grid.codes.dtype == torch.int8 and grid.codes.abs().max() <= 127
    error = (dequantize_int8(grid) - weight).abs()
    assert torch.all(error <= grid.scale[:, None] / 2 + 1e-7)
    assert torch.equal(dequantize_int8(grid)[5], torch.zeros(80))
    # The largest magnitude of each row is exact: it is +-127 steps.
    rows = torch.arange(48)
    peak = weight.abs().argmax(dim=1)
    assert torch.allclose(dequantize_int8(grid)[rows, peak], weight[rows, peak], rtol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(group_size):
    torch.manual_seed(1)
    weight = torch.randn(24, 256) + 0.3
    grid = quantize_int4(weight, group_size)
    assert grid.scales.shape == (24, 256 // group_size) and grid.zeros.dtype == torch.uint8
    assert grid.codes.max() <= 15 and grid.zeros.max() <= 15
    step = grid.scales.repeat_interleave(group_size, dim=1)
    assert torch.all((dequantize_int4(grid) - weight).abs() <= step / 2 + 1e-6)


def test_int4_keeps_zero_exact_and_handles_one_signed_groups():
    weight = torch.cat([torch.rand(4, 32) + 0.5, -torch.rand(4, 32) - 0.5, torch.zeros(4, 32)], dim=1)
    weight[0, 3] = 0.0
    grid = quantize_int4(weight, 32)
    restored = dequantize_int4(grid)
    assert restored[0, 3] == 0 and torch.equal(restored[:, 64:], torch.zeros(4, 32))
    assert torch.all(restored[:, :32] >= 0) and torch.all(restored[:, 32:64] <= 0)


def test_pack_and_unpack_are_exact_inverses_and_nibble_order_is_fixed():
    codes = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 5)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8))) == 3 | (12 << 4)


def test_bad_input_is_refused_with_what_is_accepted():
    with pytest.raises(GridError, match="one of"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(GridError, match="does not divide.*96"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(GridError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(GridError, match="2-D"):
        quantize_int8(torch.randn(8))
    with pytest.raises(GridError, match="even number"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
