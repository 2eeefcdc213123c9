"""Qwen2-VL and Qwen2.5-VL for transformer-bridge: vision transformer, merger, language model.

Installed, it is found through the ``transformer_bridge`` entry point ``qwen2vl``
(`bridge_qwen2vl.plugin`); nothing needs importing to use it.
"""

__version__ = "0.1.0"
