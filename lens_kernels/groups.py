"""Group layout: which rows answer the same prompt, in the forms the backends need."""
from __future__ import annotations

from typing import NamedTuple

import torch


class GroupLayout(NamedTuple):
    """Groups of rows, dense-numbered ``0 .. num_groups - 1``.

    ``group_id[b]`` is row ``b``'s group; ``order`` lists the rows sorted by group (stable),
    group ``g`` owning ``order[start[g] : start[g] + size[g]]``; ``max_size`` bounds ``size``.
    """

    group_id: torch.Tensor  # [B] int64
    order: torch.Tensor  # [B] int64
    start: torch.Tensor  # [num_groups] int64
    size: torch.Tensor  # [num_groups] int64
    num_groups: int
    max_size: int


def contiguous_groups(batch: int, group_size: int, device: torch.device) -> GroupLayout:
    """Groups of ``group_size`` consecutive rows; builds everything on ``device``, no sync."""
    num_groups = batch // group_size
    rows = torch.arange(batch, device=device, dtype=torch.int64)
    starts = torch.arange(num_groups, device=device, dtype=torch.int64) * group_size
    sizes = torch.full((num_groups,), group_size, device=device, dtype=torch.int64)
    return GroupLayout(rows // group_size, rows, starts, sizes, num_groups, group_size)


def indexed_groups(group_index: torch.Tensor) -> GroupLayout:
    """Groups from arbitrary int64 labels ``group_index [B]``; groups are numbered in the
    order of their sorted labels.  Needs one host sync (the number of groups)."""
    labels, group_id, sizes = torch.unique(group_index, return_inverse=True, return_counts=True)
    order = torch.sort(group_id, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    return GroupLayout(
        group_id, order, starts, sizes, int(labels.numel()), int(sizes.max().item())
    )
