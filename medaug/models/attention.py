"""An attention processor for training on a CPU: PyTorch's fused attention kernel forward, an explicit-matmul backward.

PyTorch's CPU flash-attention kernel is the fastest attention forward there, but its backward pass is slow: in a
LoRA step of the `small` UNet at 128 px (bf16, batch 4) it took over a third of the step. diffusers' classic
processor (QKᵀ, softmax, PV as batched matmuls) trains faster on this CPU but samples slower and keeps every
layer's attention matrix for the backward pass. `MatmulBackwardAttention` keeps the fused forward and, in the
backward pass, recomputes one layer's attention probabilities with a matmul and writes out the gradients with
matmuls: about the classic backward's speed, without storing attention matrices (one exists at a time, during its
layer's backward). Measured in benchmarks/RESULTS.md ("2026-12-06: bf16 training on a CPU keeps PyTorch's fused
attention forward"): 1.28x for the LoRA step, none in fp32. On CUDA, training keeps diffusers' default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_probabilities(query, key, mask=None):
    """softmax(QKᵀ/√d + mask) in Q's dtype; `mask` boolean (True: attend) or additive."""
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


class _RecomputedAttention(torch.autograd.Function):
    """Forward: PyTorch's fused scaled-dot-product attention. Backward: the attention probabilities P recomputed with
    a matmul, then the gradients of O = PV written out: dV = Pᵀ dO, dS = P (dO Vᵀ - rowsum(dO O)), dQ = dS K/√d,
    dK = dSᵀ Q/√d."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        ctx.save_for_backward(query, key, value, mask, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, mask, output = ctx.saved_tensors
        grad_output = grad_output.to(value.dtype)
        probabilities = attention_probabilities(query, key, mask)
        grad_value = probabilities.transpose(-1, -2) @ grad_output
        wide = torch.promote_types(value.dtype, torch.float32)  # the row sums in at least fp32
        row_sums = (grad_output.to(wide) * output.to(wide)).sum(dim=-1, keepdim=True).to(value.dtype)
        grad_scores = (grad_output @ value.transpose(-1, -2)).sub_(row_sums).mul_(probabilities)
        scale = query.shape[-1] ** -0.5
        return (grad_scores @ key) * scale, (grad_scores.transpose(-1, -2) @ query) * scale, grad_value, None


def recomputed_attention(query, key, value, mask=None):
    """Scaled-dot-product attention whose backward pass recomputes it with matmuls (module docstring). Under
    autocast, Q, K and V are cast as autocast casts them for PyTorch's own attention."""
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(dtype)
    with torch.autocast(query.device.type, enabled=False):
        return _RecomputedAttention.apply(query, key, value, mask)


class MatmulBackwardAttention:
    """diffusers' attention-processor interface (as `AttnProcessor2_0`): the same arithmetic, with the attention
    product run by `recomputed_attention` when gradients are taken, by PyTorch's fused kernel otherwise."""

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
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (query, key, value)):
            attended = recomputed_attention(query, key, value, attention_mask)
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                      is_causal=False)
        hidden_states = attended.transpose(1, 2).flatten(2).to(query.dtype)
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


def use_matmul_backward_attention(*models) -> None:
    """Give every attention layer of `models` (UNets, ControlNets) the MatmulBackwardAttention processor."""
    for model in models:
        model.set_attn_processor(MatmulBackwardAttention())
