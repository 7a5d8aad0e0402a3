"""Prompt-CAM on a frozen timm VisionTransformer.

Prompt-CAM (Chowdhury et al., CVPR 2025, arXiv 2501.09333) gives a frozen pre-trained ViT one
learnable prompt per class. The output ``z^c`` of class ``c``'s prompt in the last block is
scored by one vector shared by all classes, ``s[c] = w . norm(z^c) + b``; since ``w`` is shared,
a class can only win by *attending* to its own traits, so the last block's attention of class
``c``'s prompt over the image patches (one map per head) explains the decision.

Two layouts:

* ``"reference"`` matches Imageomics/Prompt_CAM (commit 7722fc2). Every block gets its own ``C``
  prompts (deep variant) in the token order ``[prompts, prefix (CLS, registers), patches]``;
  prompts are dropped after each block; attention is unmasked. The shallow variant prepends the
  class prompts once and carries them through all blocks.
* ``"scalable"`` keeps a fixed number of class-agnostic prompts in blocks ``1..N-1``; in block
  ``N`` the ``C`` class prompts attend to the image tokens only. There a class prompt contributes
  *only its query*: the residual stream its attention output is added to is ``readout_token``,
  one learned token shared by all classes. The score of class ``c`` is thus a function of its
  attention pattern alone: if every image token entering the last block is identical, all ``C``
  scores are exactly equal, and a class can only gain by attending to different tokens.

Only the prompts, the shared head (and the readout token) are trainable; the backbone is frozen
and kept in eval mode. Prompt dropout (one mask per step, as in the reference) and stochastic
depth (timm's linear decay rule) are applied by this module, in training only.

The last block never computes queries, attention rows or MLP outputs for the image tokens: the
reference discards them. Attention uses ``F.scaled_dot_product_attention`` except where the
weights are returned (:meth:`PromptCAM.forward_with_attention`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, calculate_drop_path_rates, drop_path
from torch import Tensor, nn
from torch.func import functional_call

from promptcam.model.backbone import _check_supported, backbone_from_spec, resolve_preprocessing
from promptcam.model.spec import BackboneSpec, PromptCAMConfig

ModuleCall = Callable[[nn.Module, Tensor], Tensor]


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H * d) -> (B, H, T, d)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H * d)."""
    return x.transpose(-3, -2).flatten(-2)


def _queries(attn: Attention, x: Tensor) -> Tensor:
    """Queries of normed tokens ``x`` only: the first third of ``attn.qkv``."""
    bias = None if attn.qkv.bias is None else attn.qkv.bias[: attn.attn_dim]
    q = F.linear(x, attn.qkv.weight[: attn.attn_dim], bias)
    return attn.q_norm(_split_heads(q, attn.num_heads))


def _keys_values(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of normed tokens ``x`` only: the last two thirds of ``attn.qkv``."""
    bias = None if attn.qkv.bias is None else attn.qkv.bias[attn.attn_dim :]
    k, v = F.linear(x, attn.qkv.weight[attn.attn_dim :], bias).chunk(2, dim=-1)
    return attn.k_norm(_split_heads(k, attn.num_heads)), _split_heads(v, attn.num_heads)


def _call(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _call_in_dtype(dtype: torch.dtype, module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with the module's floating-point tensors cast to ``dtype`` (gradients still
    reach the originals), for use with autocast off."""
    tensors = {
        name: tensor.to(dtype)
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
        if tensor.is_floating_point()
    }
    return functional_call(module, tensors, (x,))


def _attention_output(attn: Attention, heads: Tensor, apply: ModuleCall = _call) -> Tensor:
    """Merged head outputs (..., H * d) -> block dimension; ``apply(module, x)`` runs each
    module."""
    return apply(attn.proj, apply(attn.norm, heads))


def _self_attention(attn: Attention, x: Tensor) -> Tensor:
    q, k, v = _split_heads(attn.qkv(x), 3 * attn.num_heads).chunk(3, dim=1)
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
    return _attention_output(attn, _merge_heads(out))


class PromptCAM(nn.Module):
    """Class prompts in a frozen ViT, scored by one shared ``Linear(D, 1)``; see module docs.

    Trainable tensors: ``prompt_embeddings`` (reference layout: (depth, C, D) for deep,
    (1, C, D) for shallow) or ``agnostic_prompts`` (depth - 1, A, D), ``class_prompts`` (C, D)
    and ``readout_token`` (D,) (scalable layout), plus ``head``.
    """

    def __init__(self, backbone: BackboneSpec, config: PromptCAMConfig) -> None:
        super().__init__()
        vit = backbone_from_spec(backbone)
        _check_supported(vit, backbone.name)
        vit.requires_grad_(False)
        self.backbone = vit.eval()
        self.backbone_spec = backbone
        self.config = config
        # What the inputs must be: the weights' family's, or the spec's overrides.
        self.preprocessing = resolve_preprocessing(backbone, vit)

        depth, dim, num_classes = len(vit.blocks), vit.embed_dim, config.num_classes
        if config.layout == "reference":
            prompt_blocks = depth if config.variant == "deep" else 1
            self.prompt_embeddings = nn.Parameter(torch.empty(prompt_blocks, num_classes, dim))
        else:
            self.agnostic_prompts = nn.Parameter(
                torch.empty(depth - 1, config.num_agnostic_prompts, dim)
            )
            self.class_prompts = nn.Parameter(torch.empty(num_classes, dim))
            self.readout_token = nn.Parameter(torch.empty(dim))
        self.head = nn.Linear(dim, 1)
        # Off: autocast keeps the class rows' LayerNorms and residual adds in fp32. On: under
        # autocast they run wholly in its dtype, halving the memory traffic of the C class rows
        # of the last block, which dominates training at large C on a GPU.
        self.class_rows_in_autocast_dtype = False
        self.drop_path_rates: tuple[float, ...] = tuple(
            calculate_drop_path_rates(config.drop_path_rate, depth)
        )
        self.reset_prompts()

    @torch.no_grad()
    def reset_prompts(self) -> None:
        """Every trainable tensor but the head ~ U(-a, a), a = sqrt(6 / (channels * patch area
        + D)): VPT's and the reference's "xavier uniform"."""
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        fan_in = self.backbone.in_chans * patch_h * patch_w
        bound = math.sqrt(6.0 / (fan_in + self.backbone.embed_dim))
        for name, param in self.named_parameters():
            if not name.startswith(("backbone.", "head.")):
                param.uniform_(-bound, bound)

    def train(self, mode: bool = True) -> PromptCAM:
        super().train(mode)
        # Frozen statistics and no dropout inside the backbone, as for a fixed feature extractor.
        self.backbone.eval()
        return self

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_heads(self) -> int:
        return self.backbone.blocks[-1].attn.num_heads

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch rows and columns of an input of the backbone's ``img_size``: the attention maps'
        last axis is this grid, row-major."""
        return tuple(self.backbone.patch_embed.grid_size)

    def patch_grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns of a ``height`` x ``width`` input, which must be the backbone's
        ``img_size``, or with ``dynamic_img_size`` any multiple of the patch size."""
        patch_embed = self.backbone.patch_embed
        patch_h, patch_w = patch_embed.patch_size
        if self.backbone.dynamic_img_size:
            if height % patch_h or width % patch_w:
                raise ValueError(
                    f"images are {height}x{width} px, not a multiple of the patch size "
                    f"{patch_h}x{patch_w}: pad or resize them"
                )
        elif (height, width) != tuple(patch_embed.img_size):
            expected = "x".join(str(size) for size in patch_embed.img_size)
            raise ValueError(
                f"images are {height}x{width} px but the backbone takes {expected} "
                "(backbone.kwargs.img_size): resize them as the checkpoint's preprocessing says, "
                "or build the backbone with dynamic_img_size: true"
            )
        return height // patch_h, width // patch_w

    @property
    def _num_leading_tokens(self) -> int:
        """Tokens before the patches in :meth:`encode_to_last_block`'s output."""
        carried = self.num_classes if self.config.variant == "shallow" else 0
        return carried + self.backbone.num_prefix_tokens

    def _dropout(self, prompts: Tensor) -> Tensor:
        # One mask for the whole batch, as in the reference (dropout before expand).
        return F.dropout(prompts, self.config.prompt_dropout, self.training)

    def _run_block(self, index: int, x: Tensor) -> Tensor:
        block, rate = self.backbone.blocks[index], self.drop_path_rates[index]
        x = x + drop_path(
            block.ls1(_self_attention(block.attn, block.norm1(x))), rate, self.training
        )
        return x + drop_path(block.ls2(block.mlp(block.norm2(x))), rate, self.training)

    def _run_block_with_prompts(self, index: int, prompts: Tensor, x: Tensor) -> Tensor:
        """Prepend ``prompts`` (P, D) before block ``index`` and drop them after it."""
        if prompts.shape[0] == 0:
            return self._run_block(index, x)
        prompts = self._dropout(prompts).expand(x.shape[0], -1, -1)
        return self._run_block(index, torch.cat([prompts, x], dim=1))[:, prompts.shape[1] :]

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> tokens entering block 1: [prefix (CLS, registers), patches]."""
        self.patch_grid_for(*x.shape[-2:])  # a clear error for a size the backbone cannot take
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def encode_to_last_block(self, x: Tensor) -> Tensor:
        """Images -> tokens entering the last block, before its prompts are prepended.

        Deep and scalable: the image tokens (B, prefix + patches, D). Shallow: the carried class
        prompt states come first, (B, C + prefix + patches, D).
        """
        tokens = self.embed(x)
        last = len(self.backbone.blocks) - 1
        if self.config.layout == "scalable":
            for index in range(last):
                tokens = self._run_block_with_prompts(index, self.agnostic_prompts[index], tokens)
        elif self.config.variant == "deep":
            for index in range(last):
                tokens = self._run_block_with_prompts(index, self.prompt_embeddings[index], tokens)
        else:
            prompts = self._dropout(self.prompt_embeddings[0]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([prompts, tokens], dim=1)
            for index in range(last):
                tokens = self._run_block(index, tokens)
        return tokens

    def _last_block_inputs(
        self, tokens: Tensor, classes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries (B, H, C, d) of the class rows, keys and values (B, H, T, d) of all tokens the
        class rows attend to, and the class rows' residual stream (B or 1, C, D); with
        ``classes`` (scalable layout only), the rows of those classes alone, in that order."""
        batch = tokens.shape[0]
        block = self.backbone.blocks[-1]
        if classes is not None and self.config.layout != "scalable":
            raise ValueError(
                "scoring a subset of the classes needs the scalable layout: in the reference "
                "layout the class prompts attend to each other, so every score needs all of them"
            )
        if self.config.layout == "scalable":
            prompts = self.class_prompts if classes is None else self.class_prompts[classes]
            queries_from = self._dropout(prompts)[None]
            residual = self.readout_token.expand_as(queries_from)
            context = tokens
        elif self.config.variant == "deep":
            queries_from = residual = self._dropout(self.prompt_embeddings[-1])[None]
            context = torch.cat([residual.expand(batch, -1, -1), tokens], dim=1)
        else:
            queries_from = residual = tokens[:, : self.num_classes]
            context = tokens
        q = _queries(block.attn, block.norm1(queries_from)).expand(batch, -1, -1, -1)
        k, v = _keys_values(block.attn, block.norm1(context))
        return q, k, v, residual

    def _class_rows_dtype(self, device_type: str) -> torch.dtype | None:
        """The dtype the class rows run in wholly, or None to leave every op to autocast."""
        if self.class_rows_in_autocast_dtype and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None

    def _last_block_scores(self, heads: Tensor, residual: Tensor) -> Tensor:
        """Merged head outputs (B, ..., H * d) of class rows -> scores (B, ...)."""
        block, rate = self.backbone.blocks[-1], self.drop_path_rates[-1]
        dtype = self._class_rows_dtype(heads.device.type)
        if dtype is None:
            apply, precision = _call, contextlib.nullcontext()
        else:
            apply = functools.partial(_call_in_dtype, dtype)
            precision = torch.autocast(heads.device.type, enabled=False)
            heads, residual = heads.to(dtype), residual.to(dtype)
        with precision:
            attended = apply(block.ls1, _attention_output(block.attn, heads, apply))
            x = residual + drop_path(attended, rate, self.training)
            mlp = apply(block.mlp, apply(block.norm2, x))
            x = x + drop_path(apply(block.ls2, mlp), rate, self.training)
            return apply(self.head, apply(self.backbone.norm, x)).squeeze(-1)

    def last_block_scores(
        self,
        tokens: Tensor,
        class_index: Tensor | None = None,
        blurred_heads: Tensor | None = None,
        classes: Tensor | None = None,
    ) -> Tensor:
        """Scores (B, C) from :meth:`encode_to_last_block`'s tokens, optionally with heads blurred.

        Blurring head ``h`` of image ``b`` sets the pre-softmax logits of class
        ``class_index[b]``'s prompt row in the last block to 0 for that head (uniform attention
        over all keys), as the reference's trait identification does. Only that row changes, so
        it is recomputed alone, from the uniform average of the values.

        Args:
            tokens: Output of :meth:`encode_to_last_block`, (B, T, D).
            class_index: (B,) class whose prompt row is blurred; needed with ``blurred_heads``.
            blurred_heads: (B, H) bool, or (B, K, H) for K alternative head sets per image,
                all evaluated from one pass over ``tokens``.
            classes: (M,) class indices: score only these (scalable layout; its class rows are
                independent of each other), (B, M) in that order. Not with ``blurred_heads``.

        Returns:
            (B, C) scores, or (B, K, C) for a (B, K, H) mask.
        """
        if classes is not None and blurred_heads is not None:
            raise ValueError("classes and blurred_heads do not combine")
        q, k, v, residual = self._last_block_inputs(tokens, classes)
        heads = F.scaled_dot_product_attention(q, k, v)
        scores = self._last_block_scores(_merge_heads(heads), residual)
        if blurred_heads is None:
            return scores
        if class_index is None:
            raise ValueError("blurred_heads needs class_index")
        single = blurred_heads.dim() == 2
        mask = blurred_heads[:, None] if single else blurred_heads
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        attended = heads[batch, :, class_index]  # (B, H, d)
        uniform = v.mean(dim=2)
        candidates = torch.where(mask[..., None], uniform[:, None], attended[:, None])
        row_residual = residual.expand(tokens.shape[0], -1, -1)[batch, class_index]
        row_scores = self._last_block_scores(candidates.flatten(-2), row_residual[:, None])
        out = scores[:, None].expand(-1, mask.shape[1], -1).clone()
        out.scatter_(
            2, class_index[:, None, None].expand(-1, mask.shape[1], 1), row_scores[..., None]
        )
        return out[:, 0] if single else out

    def last_block_attention(
        self,
        tokens: Tensor,
        class_index: Tensor | None = None,
        blurred_heads: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Like :meth:`last_block_scores` ((B, H) masks only), materialising the attention;
        ``class_index`` may also be (B, M): the heads are blurred in all M rows of each image.

        Returns:
            scores (B, C) and attention (B, H, C, patches): the softmax over all keys of the last
            block, of each class prompt's row, sliced to the patch tokens, not renormalised.
        """
        q, k, v, residual = self._last_block_inputs(tokens)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if blurred_heads is not None:
            if class_index is None:
                raise ValueError("blurred_heads needs class_index")
            images, heads = blurred_heads.nonzero(as_tuple=True)
            rows = class_index if class_index.dim() == 2 else class_index[:, None]
            for row in rows.unbind(dim=1):
                logits[images, heads, row[images]] = 0.0
        attention = logits.softmax(dim=-1)
        scores = self._last_block_scores(_merge_heads(attention @ v), residual)
        num_patches = tokens.shape[1] - self._num_leading_tokens
        return scores, attention[..., -num_patches:]

    def forward(self, x: Tensor, classes: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) -> class scores (B, C), or (B, M) of ``classes`` (M,) only (see
        :meth:`last_block_scores`)."""
        return self.last_block_scores(self.encode_to_last_block(x), classes=classes)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> scores (B, C) and attention maps (B, H, C, patches); see
        :meth:`last_block_attention`."""
        return self.last_block_attention(self.encode_to_last_block(x))
