"""LLaVA for transformer-bridge: the CLIP vision tower, the projector and the language model.

Installed, it is found through the ``transformer_bridge`` entry point ``llava``
(`bridge_llava.plugin`); nothing needs importing to use it.
"""

from bridge_llava.components import (
    CLIPVisionEncoderBridge,
    CLIPVisionEncoderLayerBridge,
    VisionProjectorBridge,
)
from bridge_llava.tower import VisionEncoderLayerBridge, VisionTowerBridge
from bridge_llava.vision import ImageTokens

__version__ = "0.1.0"

__all__ = [
    "CLIPVisionEncoderBridge",
    "CLIPVisionEncoderLayerBridge",
    "ImageTokens",
    "VisionEncoderLayerBridge",
    "VisionProjectorBridge",
    "VisionTowerBridge",
]
