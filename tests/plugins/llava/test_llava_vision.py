"""Vision features as LLaVA uses them: selection equals HF's, encode_images, image positions."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_llava.tiny import tiny_llava


def hf_projector_input(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What HF's LLaVA feeds its projector, caught with a plain torch hook."""
    seen: list[torch.Tensor] = []
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("layer", "strategy"), [(-2, "default"), (-1, "full"), ([-3, -2], "default"), ([0, 2], "full")]
)
def test_feature_selection_equals_hfs(layer: Any, strategy: Any, image: Any) -> None:
    model, processor = tiny_llava(
        vision_feature_layer=layer, vision_feature_select_strategy=strategy
    )
    bridge = TransformerBridge.wrap(model, processor=processor)
    inputs = dict(processor(text="<image> What?", images=[image], return_tensors="pt"))
    expected = hf_projector_input(model, inputs)
    encoder = bridge.vision_encoder
    assert encoder.vision_feature_layer == layer
    assert encoder.vision_feature_select_strategy == strategy
    with torch.no_grad():
        assert torch.equal(encoder.encode_images(inputs["pixel_values"]), expected)
        outputs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    assert torch.equal(encoder.feature_select(outputs), expected)
    assert torch.equal(encoder.feature_select(outputs.hidden_states), expected)
    n_layers = 1 if isinstance(layer, int) else len(layer)
    assert expected.shape == (1, encoder.num_image_tokens, encoder.hidden_size * n_layers)


def test_feature_select_overrides_and_errors(bridge: TransformerBridge, hf_vision: Any) -> None:
    encoder = bridge.vision_encoder
    hidden = hf_vision.hidden_states
    assert torch.equal(encoder.feature_select(hf_vision, layer=0, strategy="full"), hidden[0])
    both = encoder.feature_select(hf_vision, layer=[1, -1])
    assert torch.equal(both, torch.cat([hidden[1][:, 1:], hidden[-1][:, 1:]], dim=-1))
    with pytest.raises(InputError, match=r"out of range.*2 layers.*-3\.\.2"):
        encoder.feature_select(hf_vision, layer=3)
    with pytest.raises(InputError, match=r"'default'.*'full'"):
        encoder.feature_select(hf_vision, strategy="patch")  # type: ignore[arg-type]  # on purpose
    with pytest.raises(InputError, match="output_hidden_states=True"):
        encoder.feature_select(hf_vision.last_hidden_state)


def test_tower_facts(bridge: TransformerBridge, llava: tuple[Any, Any]) -> None:
    encoder = bridge.vision_encoder
    config = llava[0].config.vision_config
    assert encoder.num_patches == (config.image_size // config.patch_size) ** 2 == 16
    assert encoder.hidden_size == config.hidden_size
    assert encoder.num_layers == config.num_hidden_layers == len(encoder.layers)
    assert encoder.dtype == torch.float32 and encoder.device == torch.device("cpu")
    assert torch.equal(encoder.dummy_feature, torch.zeros(1, config.hidden_size))
    assert encoder.num_image_tokens == 16  # "default" drops CLS
    assert encoder.image_token_id == llava[0].config.image_token_id


def test_encoder_forward_is_the_last_hidden_state(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], hf_vision: Any
) -> None:
    with torch.no_grad():
        out = bridge.vision_encoder(inputs["pixel_values"])
    assert out.shape == (
        1,
        bridge.vision_encoder.num_patches + 1,
        bridge.vision_encoder.hidden_size,
    )
    assert torch.equal(out, hf_vision.last_hidden_state)


def test_encode_images_list_of_differently_sized_images(bridge: TransformerBridge) -> None:
    encoder = bridge.vision_encoder
    small, large = torch.rand(3, 32, 32), torch.rand(3, 48, 48)
    with torch.no_grad():
        features = encoder.encode_images([small, large])
        batch = encoder.encode_images(small[None])
    assert isinstance(features, list)
    assert torch.equal(features[0], batch)
    assert features[1].shape == (1, (48 // 8) ** 2, encoder.hidden_size)


def test_encode_images_refuses_a_list_mixing_images_and_tensors(
    bridge: TransformerBridge, image: Any
) -> None:
    with pytest.raises(InputError, match=r"mixing tensors and .*item 1"):
        bridge.vision_encoder.encode_images([torch.rand(3, 32, 32), image])
    with pytest.raises(InputError, match=r"3 channels"):
        bridge.vision_encoder.encode_images(torch.rand(1, 4, 32, 32))
    with pytest.raises(InputError, match="non-empty list"):
        bridge.vision_encoder.encode_images([])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_token_positions_per_image_whatever_the_padding(
    bridge: TransformerBridge, llava: tuple[Any, Any], image: Any, padding_side: str
) -> None:
    _, processor = llava
    texts = ["<image> Hi", "A longer question <image> about <image> two images?"]
    inputs = processor(
        text=texts, images=[image] * 3, padding=True, padding_side=padding_side, return_tensors="pt"
    )
    spans = bridge.vision_encoder.image_token_positions(inputs["input_ids"])
    assert [(s.image, s.batch, len(s)) for s in spans] == [(0, 0, 16), (1, 1, 16), (2, 1, 16)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            **inputs, names_filter=["blocks.0.hook_resid_pre", "vision_projector.hook_out"]
        )
    for span in spans:
        assert span.stop - span.start == len(span)
        resid = cache["blocks.0.hook_resid_pre"][span.batch, span.start : span.stop]
        assert torch.equal(resid, cache["vision_projector.hook_out"][span.image])
