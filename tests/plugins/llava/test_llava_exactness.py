"""The bridged LLaVA is the HF model: same logits, and every vision hook holds the HF tensor."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import TransformerBridge
from bridge_core.hooks import HookPoint
from bridge_llava.tiny import tiny_llava


def test_logits_bitwise_equal_without_hooks(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], hf_out: Any
) -> None:
    with torch.no_grad():
        assert torch.equal(bridge(**inputs), hf_out.logits)


def test_caching_everything_keeps_logits_bitwise(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], hf_out: Any
) -> None:
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(logits, hf_out.logits)
    assert len(cache) == len([p for p in bridge.hook_dict.values() if p.enabled])


@pytest.fixture(scope="module")
def cache(bridge: TransformerBridge, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return bridge.run_with_cache(**inputs)[1]


def test_vision_residual_stream_is_hfs_hidden_states(cache: Any, hf_vision: Any) -> None:
    hidden = hf_vision.hidden_states
    for i in range(len(hidden) - 1):
        assert torch.equal(cache[f"vision_encoder.layers.{i}.hook_resid_pre"], hidden[i])
        assert torch.equal(cache[f"vision_encoder.layers.{i}.hook_resid_post"], hidden[i + 1])
    assert torch.equal(cache["hook_vision_out"], hf_vision.last_hidden_state)
    assert torch.equal(cache["vision_encoder.hook_vision_out"], hidden[-1])


def test_vision_embeddings_are_the_embedding_modules_output(
    bridge: TransformerBridge, cache: Any, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor]
) -> None:
    tower = llava[0].model.vision_tower
    with torch.no_grad():
        embedded = tower.embeddings(inputs["pixel_values"])
    assert torch.equal(cache["hook_vision_embed"], embedded)
    assert torch.equal(cache["vision_encoder.hook_vision_embed"], embedded)
    assert torch.equal(cache["vision_encoder.pre_layernorm.hook_out"], tower.pre_layrnorm(embedded))
    assert torch.equal(cache["vision_encoder.hook_in"], inputs["pixel_values"])


def test_projector_hooks_are_its_input_and_output(
    cache: Any, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor], hf_vision: Any
) -> None:
    model = llava[0]
    selected = hf_vision.hidden_states[model.config.vision_feature_layer][:, 1:]
    assert torch.equal(cache["vision_projector.hook_in"], selected)
    with torch.no_grad():
        projected = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    assert torch.equal(cache["vision_projector.hook_out"], torch.stack(list(projected)))


def test_image_features_enter_the_language_model_at_the_image_tokens(
    bridge: TransformerBridge, cache: Any, inputs: dict[str, torch.Tensor]
) -> None:
    (span,) = bridge.vision_encoder.image_token_positions(inputs["input_ids"])
    resid = cache["blocks.0.hook_resid_pre"][span.batch, span.positions]
    assert torch.equal(resid, cache["vision_projector.hook_out"][span.image])
    # hook_embed is the token embedding: at image positions, the placeholder's own embedding
    placeholder = cache["hook_embed"][span.batch, span.positions]
    assert torch.equal(placeholder, placeholder[:1].expand_as(placeholder))


def test_vision_attention_hooks_shapes_and_values(
    cache: Any, llava: tuple[Any, Any], hf_vision: Any
) -> None:
    attn = llava[0].model.vision_tower.encoder.layers[1].self_attn
    x = llava[0].model.vision_tower.encoder.layers[1].layer_norm1(hf_vision.hidden_states[1])
    heads, d_head = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(*x.shape[:-1], heads, d_head)
    assert torch.equal(cache["vision_encoder.layers.1.attn.hook_q"], q)
    pattern = cache["vision_encoder.layers.1.attn.hook_pattern"]
    assert pattern.shape == (1, heads, x.shape[1], x.shape[1])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    scores = q.transpose(1, 2) @ attn.k_proj(x).view_as(q).transpose(1, 2).transpose(-1, -2)
    torch.testing.assert_close(pattern, (scores * attn.scale).softmax(-1))
    assert cache["vision_encoder.layers.1.attn.hook_z"].shape == (1, x.shape[1], heads, d_head)
    assert cache["vision_encoder.layers.1.mlp.hook_pre"].shape[-1] == attn.embed_dim * 4


def zero(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(tensor)


def test_ablating_the_selected_layer_equals_a_torch_hook_on_hf(
    bridge: TransformerBridge, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor], hf_out: Any
) -> None:
    """LLaVA reads hidden_states[-2] (layer 0's output here), recorded by transformers' own
    hooks: the edit must be made before them, as a prepended torch hook does."""
    model = llava[0]
    selected = model.config.vision_feature_layer % (bridge.vision_encoder.num_layers + 1) - 1
    name = f"vision_encoder.layers.{selected}.hook_resid_post"
    with torch.no_grad():
        ablated = bridge.run_with_hooks(**inputs, fwd_hooks=[(name, zero)])
        layer = model.model.vision_tower.encoder.layers[selected]
        handle = layer.register_forward_hook(lambda m, a, out: torch.zeros_like(out), prepend=True)
        try:
            reference = model(**inputs).logits
        finally:
            handle.remove()
    assert torch.equal(ablated, reference)
    assert not torch.equal(ablated, hf_out.logits)


def test_ablating_projector_input_and_a_vision_head(
    bridge: TransformerBridge, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor]
) -> None:
    model = llava[0]

    def ablate_head(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooks = [
        ("vision_projector.hook_in", zero),
        ("vision_encoder.layers.0.attn.hook_z", ablate_head),
    ]
    with torch.no_grad():
        ablated = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        out_proj = model.model.vision_tower.encoder.layers[0].self_attn.out_proj
        d_head = model.model.vision_tower.encoder.layers[0].self_attn.head_dim

        def torch_ablate_head(module: Any, args: Any) -> Any:
            z = args[0].clone()
            z[..., d_head : 2 * d_head] = 0
            return (z,)

        handles = [
            model.model.multi_modal_projector.register_forward_pre_hook(
                lambda m, args: (torch.zeros_like(args[0]),)
            ),
            out_proj.register_forward_pre_hook(torch_ablate_head),
        ]
        try:
            reference = model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()
    assert torch.equal(ablated, reference)


def test_pattern_edit_in_a_vision_layer_reaches_the_logits(
    bridge: TransformerBridge, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor], hf_out: Any
) -> None:
    """A uniform pattern makes each head output the mean of its values."""
    model = llava[0]
    attn = model.model.vision_tower.encoder.layers[0].self_attn

    def uniform(pattern: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return torch.full_like(pattern, 1 / pattern.shape[-1])

    def mean_of_values(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        values = module.v_proj(kwargs["hidden_states"])
        mean = values.mean(dim=1, keepdim=True).expand_as(values)
        return (module.out_proj(mean), *output[1:])

    with torch.no_grad():
        edited = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("vision_encoder.layers.0.attn.hook_pattern", uniform)]
        )
        handle = attn.register_forward_hook(mean_of_values, with_kwargs=True)
        try:
            reference = model(**inputs).logits
        finally:
            handle.remove()
    assert not torch.equal(edited, hf_out.logits)
    torch.testing.assert_close(edited, reference)
    assert model.config.vision_config._attn_implementation == "sdpa"  # restored


def test_editing_hook_vision_out_reaches_a_model_that_selects_the_last_layer(
    image: Any,
) -> None:
    model, processor = tiny_llava(vision_feature_layer=-1)
    bridge = TransformerBridge.wrap(model, processor=processor)
    inputs = processor(text="<image> Hi", images=[image], return_tensors="pt")
    with torch.no_grad():
        plain = bridge(**inputs)
        edited = bridge.run_with_hooks(**inputs, fwd_hooks=[("hook_vision_out", zero)])
        outputs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    assert not torch.equal(edited, plain)
    with torch.no_grad(), bridge.hooks(fwd_hooks=[("hook_vision_out", zero)]):
        features = bridge.vision_encoder.encode_images(inputs["pixel_values"])
    assert torch.equal(features, torch.zeros_like(outputs.last_hidden_state[:, 1:]))
    assert not any(p.has_hooks() for p in bridge.hook_dict.values())
