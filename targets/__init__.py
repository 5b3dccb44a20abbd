"""Device configs (TOML, one per device) and their binding to the machine at hand."""

from targets.config import (
    BenchRules,
    IsaLevel,
    ResolvedTarget,
    TargetConfig,
    available,
    load_target,
    resolve,
)

__all__ = ["BenchRules", "IsaLevel", "ResolvedTarget", "TargetConfig", "available", "load_target", "resolve"]
