"""An attention processor for bf16 training on a CPU: projections in the autocast dtype, softmax(QKᵀ)V in fp32.

PyTorch's CPU flash-attention kernel computes its backward pass in bf16 about 4x slower than in fp32 (profiled on
the `small` UNet, LoRA step at batch 4: 131 ms against 33 ms, over a third of the bf16 step), while every other
op of the step gains from bf16. Running only the attention product in fp32 keeps both gains. On CUDA, where bf16
attention is fast, training keeps diffusers' default processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FP32AttentionProcessor:
    """diffusers' attention-processor interface (as `AttnProcessor2_0`): the same arithmetic, with the scaled
    dot-product attention run on fp32 copies of Q, K and V and its output cast back to their dtype."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_length = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key, value = (self._heads(attn, tensor) for tensor in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else (
            attention_mask.float())
        attended = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                                  dropout_p=0.0, is_causal=False).to(query.dtype)
        hidden_states = attended.transpose(1, 2).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _heads(attn, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads x dim) -> (batch, heads, tokens, dim)."""
        return tensor.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def use_fp32_attention(*models) -> None:
    """Give every attention layer of `models` (UNets, ControlNets) the FP32AttentionProcessor."""
    for model in models:
        model.set_attn_processor(FP32AttentionProcessor())
