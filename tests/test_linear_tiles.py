"""The autotuned tile configurations of the Triton fused-linear kernels (``linear_tile``):
invariants the kernels rely on, checked on the GPU candidates even where no GPU is present
(the interpreter runs one tiny configuration; the GPU lists are only benchmarked there)."""
from __future__ import annotations

import pytest
import torch

from lens_kernels.backends.triton import linear_tile

FAMILIES = ("logits", "dh", "dw")
# Shared memory of one Hopper multiprocessor available to a block (227 KB).
HOPPER_SMEM = 227 * 1024


@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(linear_tile, "interpreting", lambda: False)
    return {dtype: linear_tile.tiles_for(dtype, torch.device("cuda")) for dtype in (torch.bfloat16, torch.float32)}


def test_every_forward_tile_width_divides_the_split(gpu_tiles):
    """``_partials_kernel`` walks ``split_cols // BLOCK_V`` tiles per split: a width that does
    not divide it would leave vocabulary columns out of the logsumexp."""
    for size, configs in linear_tile.gpu_configs()["logits"].items():
        for config in configs:
            width = config.kwargs["BLOCK_V"]
            for tiles in gpu_tiles.values():
                assert tiles.split_cols % width == 0 and tiles.chunk_align % width == 0, (size, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_candidates_fit_hopper_shared_memory(family):
    """Operand tiles times pipeline stages within one multiprocessor's shared memory (a
    candidate that does not fit would only be discarded by the autotuner, never picked)."""
    for size, configs in linear_tile.gpu_configs()[family].items():
        for config in configs:
            b = config.kwargs
            if family == "logits":
                tile = b["BLOCK_N"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_V"]
            elif family == "dh":
                tile = b["BLOCK_N"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_D"]
            else:
                tile = (b["BLOCK_V"] + b["BLOCK_D"]) * 64  # dW: BLOCK_K is Tiles.dw_rows = 64
            assert config.num_stages * tile * size <= HOPPER_SMEM, (family, size, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_keeps_the_candidates_of_the_operand_dtype(family, monkeypatch):
    configs = linear_tile.gpu_configs()[family]
    monkeypatch.setattr(linear_tile, "CONFIGS", {family: configs})
    prune = linear_tile._for_dtype(family, "x_ptr")
    every = configs[2] + configs[4]
    for dtype, size in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        kept = prune(every, {"x_ptr": torch.empty(1, dtype=dtype)})
        assert kept == configs[size] and len(kept) >= 2


def test_the_interpreter_runs_one_configuration_per_family():
    """One configuration, shared by both element sizes: the autotuner never benchmarks on the CPU."""
    for family, by_size in linear_tile.interpreter_configs().items():
        assert len(by_size[2]) == 1 and by_size[2] is by_size[4], family
