"""Generic component bridges; architecture-specific ones come from plugins."""

from bridge_core.components.base import GeneralizedComponent
from bridge_core.components.standard import (
    AttentionBridge,
    BlockBridge,
    EmbeddingBridge,
    JointQKVAttentionBridge,
    MLPBridge,
    ModuleBridge,
    NormalizationBridge,
    UnembeddingBridge,
)

__all__ = [
    "AttentionBridge",
    "BlockBridge",
    "EmbeddingBridge",
    "GeneralizedComponent",
    "JointQKVAttentionBridge",
    "MLPBridge",
    "ModuleBridge",
    "NormalizationBridge",
    "UnembeddingBridge",
]
