"""A tensor as a device build lays it out: shape and dtype, and the bytes its buffer takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * tvm.DataType(self.dtype).bits // 8
