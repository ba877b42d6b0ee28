"""Who this process is in the job: the one fact every builder needs about distribution."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of training processes."""
    local_rank: int = 0
    """Rank within the node."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """Read RANK/WORLD_SIZE/LOCAL_RANK as set by torchrun, accelerate launch or submitit."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))
