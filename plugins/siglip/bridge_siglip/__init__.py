"""SigLIP vision-language models for transformer-bridge: PaliGemma (1 and 2), Gemma-3,
Idefics3 / SmolVLM and LLaVA-OneVision.

Installed, it is found through the ``transformer_bridge`` entry point ``siglip``
(`bridge_siglip.plugin`); nothing needs importing to use it. The vision tower, feature
selection and image-layout machinery it builds on are `bridge_llava`'s (`bridge_llava.tower`,
`bridge_llava.layout`), shared with the CLIP towers of LLaVA.
"""

from bridge_siglip.components import SiglipVisionEncoderBridge, VisionEmbeddingsBridge
from bridge_siglip.families import FAMILIES, Family

__version__ = "0.1.0"

__all__ = ["FAMILIES", "Family", "SiglipVisionEncoderBridge", "VisionEmbeddingsBridge"]
