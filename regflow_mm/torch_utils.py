"""Small torch helpers shared by the representations and the flows."""
from __future__ import annotations

import torch
from torch import nn


class DeviceAnchored(nn.Module):
    """A module that knows its floating dtype and device even without parameters.

    Call ``self._register_anchor()`` in ``__init__``: a zero-size buffer then follows ``.to()``,
    ``.double()`` and ``.cuda()`` and answers ``dtype`` / ``device``.
    """

    def _register_anchor(self) -> None:
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device
