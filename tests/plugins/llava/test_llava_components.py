"""The plugin's kinds, spec and names: found through the registry, the contract's names."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bridge_adapters.tiny import tiny_llama
from bridge_core import AdapterSpec, SpecError, TransformerBridge, get_registry
from bridge_core.spec import spec_files
from bridge_llava.components import (
    CLIPVisionEncoderBridge,
    CLIPVisionEncoderLayerBridge,
    VisionProjectorBridge,
)
from bridge_llava.tiny import tiny_llava


def test_registered_through_the_entry_point() -> None:
    registry = get_registry()
    assert registry.adapter_for("LlavaForConditionalGeneration").name == "llava"
    assert registry.adapter_for("LlavaNextForConditionalGeneration").name == "llava_next"
    assert registry.adapter_source("llava").distribution == "transformer-bridge-llava"
    assert registry.component_class("clip_vision_encoder") is CLIPVisionEncoderBridge
    assert registry.component_class("clip_vision_encoder_layer") is CLIPVisionEncoderLayerBridge
    assert registry.component_class("vision_projector") is VisionProjectorBridge


def test_contract_class_attributes() -> None:
    assert CLIPVisionEncoderBridge.hook_aliases == {
        "hook_vision_embed": "embeddings.hook_out",
        "hook_vision_out": "hook_out",
    }
    assert CLIPVisionEncoderLayerBridge.is_list_item is True
    assert CLIPVisionEncoderLayerBridge.hook_aliases == {
        "hook_attn_in": "attn.hook_in",
        "hook_attn_out": "attn.hook_out",
        "hook_mlp_in": "mlp.hook_in",
        "hook_mlp_out": "mlp.hook_out",
        "hook_resid_post": "hook_out",
        "hook_resid_pre": "hook_in",
    }


def test_components_are_attributes(bridge: TransformerBridge, llava: tuple[Any, Any]) -> None:
    model = llava[0]
    tower = model.model.vision_tower
    encoder = bridge.vision_encoder
    assert isinstance(encoder, CLIPVisionEncoderBridge)
    assert encoder.original_component is tower
    layer = encoder.layers[1]
    assert isinstance(layer, CLIPVisionEncoderLayerBridge)
    assert layer.layer_norm1.original_component is tower.encoder.layers[1].layer_norm1
    assert layer.attn.original_component is tower.encoder.layers[1].self_attn
    assert layer.self_attn is layer.attn  # HF's name for it
    assert layer.mlp.original_component is tower.encoder.layers[1].mlp
    assert encoder.pre_layernorm.original_component is tower.pre_layrnorm
    assert bridge.vision_projector.original_component is model.model.multi_modal_projector
    assert (
        bridge.blocks[0].attn.original_component is model.model.language_model.layers[0].self_attn
    )
    assert bridge.unembed.original_component is model.lm_head
    real = encoder.real_components
    assert real["vision_encoder.layers.1.attn"] is tower.encoder.layers[1].self_attn
    assert real["vision_encoder.embeddings"] is tower.embeddings


def test_text_hook_names_are_a_text_only_llamas(bridge: TransformerBridge) -> None:
    llama, tokenizer = tiny_llama()
    text_names = TransformerBridge.wrap(llama, tokenizer=tokenizer).hook_names()
    assert set(text_names) <= set(bridge.hook_names())


def test_vision_hook_names(bridge: TransformerBridge) -> None:
    names = set(bridge.hook_names())
    for i in range(2):
        layer = f"vision_encoder.layers.{i}"
        for hook in ("hook_resid_pre", "hook_resid_post", "hook_attn_in", "hook_attn_out"):
            assert f"{layer}.{hook}" in names
        for hook in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores"):
            assert f"{layer}.attn.{hook}" in names
            assert f"{layer}.self_attn.{hook}" in names
        assert f"{layer}.layer_norm2.hook_normalized" in names
        assert f"{layer}.mlp.hook_pre" in names
    assert bridge.hook_aliases()["vision_encoder.hook_vision_embed"] == (
        "vision_encoder.embeddings.hook_out"
    )
    assert {"hook_vision_embed", "hook_vision_out", "vision_projector.hook_in"} <= names


def test_config_has_text_and_vision_dimensions(bridge: TransformerBridge) -> None:
    cfg = bridge.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.vision_d_model, cfg.vision_n_layers, cfg.vision_n_heads) == (32, 2, 4)
    assert cfg.vision_num_patches == 16 and cfg.is_multimodal
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == bridge.vision_encoder.image_token_id


def test_specs_round_trip() -> None:
    for path in spec_files("bridge_llava"):
        spec = AdapterSpec.from_file(path)
        assert AdapterSpec.model_validate_json(spec.to_json()) == spec


class LegacyTower(nn.Module):
    """The transformers 4.x layout: CLIPVisionModel holds the transformer as `vision_model`."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.vision_model = tower
        self.config = tower.config

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values, **kwargs)


def legacy_llava(model: Any) -> nn.Module:
    """LLaVA as transformers < 4.52 laid it out: towers and language model at the top."""
    legacy = nn.Module()
    legacy.config = model.config
    legacy.vision_tower = LegacyTower(model.model.vision_tower)
    legacy.multi_modal_projector = model.model.multi_modal_projector
    legacy.language_model = nn.Module()
    legacy.language_model.model = model.model.language_model
    legacy.language_model.lm_head = model.lm_head
    return legacy


def test_transformers_4_layout_through_candidate_paths(inputs: dict[str, torch.Tensor]) -> None:
    model, _ = tiny_llava()
    bridge = TransformerBridge.wrap(legacy_llava(model), adapter="llava")
    tower = model.model.vision_tower
    assert bridge.vision_encoder.layers[0].attn.original_component is (
        tower.encoder.layers[0].self_attn
    )
    assert bridge.vision_encoder.embeddings.original_component is tower.embeddings
    assert bridge.unembed.original_component is model.lm_head
    assert bridge.ln_final.original_component is model.model.language_model.norm
    pixels = inputs["pixel_values"]
    with torch.no_grad(), bridge.hooks():
        expected = tower(pixels, output_hidden_states=True)
        assert torch.equal(bridge.vision_encoder(pixels), expected.last_hidden_state)
        assert torch.equal(
            bridge.vision_encoder.encode_images(pixels), expected.hidden_states[-2][:, 1:]
        )


def test_the_tower_bridges_itself_when_built_standalone(
    llava: tuple[Any, Any], inputs: dict[str, torch.Tensor], hf_vision: Any
) -> None:
    encoder = CLIPVisionEncoderBridge("tower")
    encoder.set_original_component(llava[0].model.vision_tower)
    assert set(encoder.real_components) >= {"tower", "tower.layers.1.attn", "tower.post_layernorm"}
    seen: list[torch.Tensor] = []
    handle = encoder.layers[1].hook_in.add_hook(lambda x, hook: seen.append(x))
    try:
        with torch.no_grad():
            assert torch.equal(encoder(inputs["pixel_values"]), hf_vision.last_hidden_state)
    finally:
        handle.remove()
    assert torch.equal(seen[0], hf_vision.hidden_states[1])


def test_a_spec_can_replace_a_part(llava: tuple[Any, Any]) -> None:
    data = AdapterSpec.from_file(spec_files("bridge_llava")[0]).model_dump()
    data["components"]["vision_encoder"]["submodules"] = {
        "post_layernorm": {"kind": "module", "path": "post_layernorm"}
    }
    bridge = TransformerBridge.wrap(llava[0], adapter=AdapterSpec.model_validate(data))
    encoder = bridge.vision_encoder
    assert type(encoder.post_layernorm).__name__ == "ModuleBridge"
    assert [name for name, _ in encoder.named_children()][-4:] == [
        "embeddings",
        "pre_layernorm",
        "layers",
        "post_layernorm",
    ]


def test_a_missing_tower_part_is_a_spec_error_naming_it(llava: tuple[Any, Any]) -> None:
    data = AdapterSpec.from_file(spec_files("bridge_llava")[0]).model_dump()
    data["components"]["vision_encoder"]["path"] = "model.multi_modal_projector"
    with pytest.raises(SpecError, match=r"'llava'.*vision_encoder.*vision_encoder.embeddings"):
        TransformerBridge.wrap(llava[0], adapter=AdapterSpec.model_validate(data))
