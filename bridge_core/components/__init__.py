"""Generic component bridges; architecture-specific ones come from plugins."""

from bridge_core.components.base import GeneralizedComponent
from bridge_core.components.moe import ExpertBridge, MoEBridge
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
    "ExpertBridge",
    "GeneralizedComponent",
    "JointQKVAttentionBridge",
    "MLPBridge",
    "MoEBridge",
    "ModuleBridge",
    "NormalizationBridge",
    "UnembeddingBridge",
]
