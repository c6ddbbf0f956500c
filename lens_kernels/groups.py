"""Group layout: which rows answer the same prompt, in the forms the backends need."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class GroupLayout(NamedTuple):
    """Groups of rows, dense-numbered ``0 .. num_groups - 1``.

    ``group_size > 0`` means contiguous groups of that many rows (``group_id = row //
    group_size``), and the index tensors are only built when a consumer asks for them
    (:meth:`tensors`): the kernels compute the rows arithmetically, with no launch.  With
    ``group_size == 0`` the groups come from labels: ``group_id[b]`` is row ``b``'s group,
    ``order`` lists the rows sorted by group (stable), group ``g`` owns
    ``order[start[g] : start[g] + size[g]]``; ``max_size`` bounds ``size``.
    """

    batch: int
    num_groups: int
    max_size: int
    group_size: int  # > 0: contiguous groups; 0: indexed (the tensors below are set)
    group_id: Optional[torch.Tensor] = None  # [B] int64
    order: Optional[torch.Tensor] = None  # [B] int64
    start: Optional[torch.Tensor] = None  # [num_groups] int64
    size: Optional[torch.Tensor] = None  # [num_groups] int64

    def tensors(self, device: torch.device) -> "GroupLayout":
        """This layout with ``group_id``, ``order``, ``start`` and ``size`` built (no sync)."""
        if self.group_id is not None:
            return self
        rows = torch.arange(self.batch, device=device, dtype=torch.int64)
        starts = torch.arange(self.num_groups, device=device, dtype=torch.int64) * self.group_size
        sizes = torch.full((self.num_groups,), self.group_size, device=device, dtype=torch.int64)
        return self._replace(group_id=rows // self.group_size, order=rows, start=starts, size=sizes)


def contiguous_groups(batch: int, group_size: int) -> GroupLayout:
    """Groups of ``group_size`` consecutive rows (nothing is allocated)."""
    return GroupLayout(batch, batch // group_size, group_size, group_size)


def indexed_groups(group_index: torch.Tensor) -> GroupLayout:
    """Groups from arbitrary int64 labels ``group_index [B]``; groups are numbered in the
    order of their sorted labels.  Needs one host sync (the number of groups)."""
    labels, group_id, sizes = torch.unique(group_index, return_inverse=True, return_counts=True)
    order = torch.sort(group_id, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    num_groups = int(labels.numel())
    max_size = int(sizes.max().item()) if num_groups else 0
    return GroupLayout(int(group_index.numel()), num_groups, max_size, 0, group_id, order, starts, sizes)
