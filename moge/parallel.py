"""The old import path of expert parallelism; it lives in moge.distributed now."""

from moge.distributed.expert_parallel import (
    EXPERT_KEYS,
    QUOTA_ROUTERS,
    ExchangeStats,
    ExpertParallelExperts,
    ExpertParallelMoGE,
    GlobalLoadMoGE,
    all_to_all,
    expert_placement,
)

__all__ = [
    "EXPERT_KEYS",
    "QUOTA_ROUTERS",
    "ExchangeStats",
    "ExpertParallelExperts",
    "ExpertParallelMoGE",
    "GlobalLoadMoGE",
    "all_to_all",
    "expert_placement",
]
