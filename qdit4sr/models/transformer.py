"""The DiT4SR transformer: SD3.5 MM-DiT blocks with a low-resolution (LR) control stream.

Built from diffusers' SD3 components so that state-dict keys follow diffusers' SD3 names plus the
`*_control` layers, and the published DiT4SR weights load unchanged.

Token layout inside every block: hidden states are [noisy; LR] on the token axis (the LR latent goes
through the same patch embedding); joint attention runs over [noisy, LR, text].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX

from .config import VARIANTS


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v over [B, H, N, d] heads.

    Fused (SDPA) while `softmax` is None. Calibration and quantization put a module there (the logit
    recorder, the 8-bit softmax-input quantizer), which switches to the explicit form so that module
    sees the scaled logits. Eagerly, the explicit form runs over chunks of heads (and of query rows
    when one head is too large) holding at most `max_scores` logits at once: full-size DiT4SR
    calibration would otherwise materialise [32, 24, 2202, 2202] logits (15 GB in float32). Every
    chunk is whole softmax rows, so the result is the same. Low-precision inputs get float32 logits
    and softmax. Traced for export, the single-op form is kept.
    """

    max_scores: int = 2**26   # logits per chunk (256 MB in float32)

    def __init__(self):
        super().__init__()
        self.softmax: nn.Module | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.softmax is None:
            return F.scaled_dot_product_attention(q, k, v)
        scale = 1.0 / math.sqrt(q.shape[-1])  # SDPA's default scale
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.softmax((q @ k.transpose(-1, -2)) * scale) @ v
        return self._chunked(q, k, v, scale)

    def _chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, n, _ = q.shape
        m = k.shape[-2]
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

        def attend(qc, kc, vc):  # 4-D slices, so the softmax module sees [batch, heads, rows, keys] logits
            logits = (qc.to(compute) @ kc.to(compute).transpose(-1, -2)) * scale
            return (self.softmax(logits) @ vc.to(compute)).to(q.dtype)

        if b * h * n * m <= self.max_scores:
            return attend(q, k, v)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        heads = max(1, min(h, self.max_scores // (n * m)))
        rows = n if n * m <= self.max_scores else max(1, self.max_scores // m)
        for i in range(b):
            for j in range(0, h, heads):
                sl = (slice(i, i + 1), slice(j, j + heads))
                for r in range(0, n, rows):
                    out[sl + (slice(r, r + rows),)] = attend(q[sl + (slice(r, r + rows),)], k[sl], v[sl])
        return out


class ControlAttention(Attention):
    """diffusers' joint Attention plus the LR-stream projections (`to_*_control`, `to_out_control`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: str | None,
                 variant: str):
        super().__init__(
            query_dim=dim,
            cross_attention_dim=None,
            added_kv_proj_dim=dim,
            dim_head=head_dim,
            heads=heads,
            out_dim=dim,
            context_pre_only=context_pre_only,
            bias=True,
            qk_norm=qk_norm,
            eps=1e-6,
        )
        self.variant = variant
        self.to_q_control = nn.Linear(self.query_dim, self.inner_dim, bias=True)
        self.to_k_control = nn.Linear(self.query_dim, self.inner_kv_dim, bias=True)
        self.to_v_control = nn.Linear(self.query_dim, self.inner_kv_dim, bias=True)
        self.to_out_control = nn.Linear(self.inner_dim, self.out_dim, bias=True)
        self.core = AttentionCore()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
        """hidden_states: [B, 2N, C] as [noisy; LR]. Returns (image_out [B, 2N, C], text_out or None)."""
        x_lr_in = hidden_states.chunk(2, dim=1)[1]
        # One call per projection over both halves: same numbers as two calls, one quantized layer call.
        q, q_lr = self.to_q(hidden_states).chunk(2, dim=1)
        k, k_lr = self.to_k(hidden_states).chunk(2, dim=1)
        v, v_lr = self.to_v(hidden_states).chunk(2, dim=1)
        q_lr, k_lr, v_lr = self.to_q_control(q_lr), self.to_k_control(k_lr), self.to_v_control(v_lr)

        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        q_lr, k_lr, v_lr = self._heads(q_lr), self._heads(k_lr), self._heads(v_lr)
        if self.norm_q is not None:
            q, q_lr = self.norm_q(q), self.norm_q(q_lr)
        if self.norm_k is not None:
            k = self.norm_k(k)
            # The published dit4sr_q checkpoint normalises the (already normalised) noisy-stream key
            # again for the LR key, so to_k_control is computed and unused; reproduce it to match its weights.
            k_lr = self.norm_k(k if self.variant == "dit4sr_q" else k_lr)

        queries, keys, values = [q, q_lr], [k, k_lr], [v, v_lr]
        if encoder_hidden_states is not None:
            cq = self._heads(self.add_q_proj(encoder_hidden_states))
            ck = self._heads(self.add_k_proj(encoder_hidden_states))
            cv = self._heads(self.add_v_proj(encoder_hidden_states))
            if self.norm_added_q is not None:
                cq = self.norm_added_q(cq)
            if self.norm_added_k is not None:
                ck = self.norm_added_k(ck)
            queries.append(cq)
            keys.append(ck)
            values.append(cv)

        out = self.core(torch.cat(queries, 2), torch.cat(keys, 2), torch.cat(values, 2))
        b = hidden_states.shape[0]
        out = out.transpose(1, 2).reshape(b, -1, self.heads * out.shape[-1])
        n_img = hidden_states.shape[1]
        img, txt = out[:, :n_img], out[:, n_img:]
        img, img_lr = img.chunk(2, dim=1)
        img = self.to_out[0](img)
        img_lr = self.to_out_control(img_lr + x_lr_in)
        img = torch.cat([img, img_lr], dim=1)
        if encoder_hidden_states is None:
            return img, None
        if self.to_add_out is not None:
            txt = self.to_add_out(txt)
        return img, txt


class ControlFeedForward(FeedForward):
    """GELU-tanh MLP whose LR half, seen on its token grid, feeds the noisy half through a depthwise conv."""

    def __init__(self, dim: int, conv_scale: float):
        super().__init__(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        inner = self.net[2].in_features
        self.control_conv = nn.Conv2d(inner, inner, 3, stride=1, padding=1, groups=inner)
        self.conv_scale = conv_scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.net[0](hidden_states)
        h_noisy, h_lr = h.chunk(2, dim=1)
        b, n, c = h_lr.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the LR token grid must be square, got {n} tokens")
        grid = h_lr.transpose(1, 2).reshape(b, c, side, side)
        conv = self.control_conv(grid).reshape(b, c, n).transpose(1, 2)
        h = torch.cat([h_noisy + self.conv_scale * conv, h_lr], dim=1)
        return self.net[2](self.net[1](h))


class DiT4SRBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: str | None,
                 use_dual_attention: bool, variant: str, conv_scale: float):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim) if use_dual_attention else AdaLayerNormZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, bias=True,
                                                        norm_type="layer_norm")
        else:
            self.norm1_context = AdaLayerNormZero(dim)
        self.attn = ControlAttention(dim, heads, head_dim, context_pre_only, qk_norm, variant)
        # The published model builds attn2 with the same class and the block's context_pre_only, so it
        # carries (unused) text projections, and no to_add_out in a last block (context_pre_only).
        self.attn2 = (ControlAttention(dim, heads, head_dim, context_pre_only, qk_norm, variant)
                      if use_dual_attention else None)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = ControlFeedForward(dim, conv_scale)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor):
        if self.use_dual_attention:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = self.norm1(hidden_states, emb=temb)
        else:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                          emb=temb)
        attn_out, ctx_attn_out = self.attn(norm_h, norm_c)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        if self.use_dual_attention:
            attn_out2, _ = self.attn2(norm_h2)
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_out2

        norm_h = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_h)

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * ctx_attn_out
        norm_c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_c)
        return encoder_hidden_states, hidden_states


class DiT4SRTransformer2DModel(ModelMixin, ConfigMixin):
    """DiT4SR: forward(hidden_states, controlnet_image, encoder_hidden_states, pooled_projections, timestep).

    `variant` selects the published `dit4sr_q` behaviour (LR key taken from the noisy stream) or the
    fixed `dit4sr_r1`. `control_conv_scale` weights the cross-stream depthwise conv.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 384,
        dual_attention_layers: tuple[int, ...] = tuple(range(13)),
        qk_norm: str | None = "rms_norm",
        variant: str = "dit4sr_q",
        control_conv_scale: float = 1.2,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DiT4SR variant {variant!r}; expected one of {VARIANTS}")
        self.out_channels = out_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        if caption_projection_dim != self.inner_dim:
            raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=self.inner_dim,
                                    pos_embed_max_size=pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=self.inner_dim,
                                                                  pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            DiT4SRBlock(self.inner_dim, num_attention_heads, attention_head_dim,
                        context_pre_only=i == num_layers - 1, qk_norm=qk_norm,
                        use_dual_attention=i in tuple(dual_attention_layers), variant=variant,
                        conv_scale=control_conv_scale)
            for i in range(num_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * out_channels, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        controlnet_image: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """Returns the predicted flow velocity [B, C_out, H, W] for the noisy latent."""
        if hidden_states.shape != controlnet_image.shape:
            raise ValueError(f"noisy latent {tuple(hidden_states.shape)} and LR latent "
                             f"{tuple(controlnet_image.shape)} must have the same shape")
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be a multiple of the patch size {p}")
        n = (height // p) * (width // p)
        hidden_states = torch.cat([self.pos_embed(hidden_states), self.pos_embed(controlnet_image)], dim=1)
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb)
        hidden_states = self.norm_out(hidden_states[:, :n], temb)
        hidden_states = self.proj_out(hidden_states)
        b = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(b, height // p, width // p, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", hidden_states).reshape(b, self.out_channels, height, width)
