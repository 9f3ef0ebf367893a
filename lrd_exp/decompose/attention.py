"""torch's attention and transformer layers, rebuilt with every projection as a child module.

``nn.MultiheadAttention`` keeps its query/key/value projections as one packed ``in_proj_weight`` and hands
``out_proj.weight`` to ``F.multi_head_attention_forward``; ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` hand
``linear1/linear2.weight`` to a fused kernel at inference. A factorized layer in their place would break them, so
the surgery first swaps each for an equivalent module here, whose projections are plain
``nn.Linear`` children that any factorized layer can replace, and which computes attention with
``F.scaled_dot_product_attention`` (explicitly when the attention weights are asked for). The registry declares them
(:mod:`lrd_exp.decompose.registry`); :mod:`lrd_exp.decompose.runnable` unpacks them. Outputs equal the
original's in train and eval, batch-first or not, with any mask; only the original's inference fast paths (a fused
kernel, nested tensors that return zeros at padded positions) are gone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.decompose.registry import unpacked


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as the additive float mask torch's attention uses."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating masks are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more attended key (bias_k / the zero key) at the end of every mask row."""
    return None if mask is None else F.pad(mask, (0, 1))


class Unpacked(nn.Module):
    """Base of the equivalents: ``replaces`` is the torch class, ``from_torch`` builds one from an instance."""

    replaces: type[nn.Module] = nn.Module

    @classmethod
    def from_torch(cls, module: nn.Module) -> Unpacked:
        raise NotImplementedError


class FactorizableMultiheadAttention(Unpacked):
    """``nn.MultiheadAttention`` with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` children.

    Same constructor, forward signature and results (batch_first, unbatched inputs, ``key_padding_mask``,
    ``attn_mask``, ``is_causal``, ``need_weights``, ``average_attn_weights``, ``add_bias_kv``, ``add_zero_attn``,
    ``kdim`` / ``vdim``). The projections always see batch-first ``(N, L, E)`` inputs.
    """

    replaces = nn.MultiheadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory)) if add_bias_kv else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections (drawn as one packed matrix when q, k and v share
        the embedding size, as torch draws them), zero biases, Xavier-normal ``bias_k`` / ``bias_v``."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            if self.kdim == self.vdim == self.embed_dim:
                packed = nn.init.xavier_uniform_(torch.empty(3 * self.embed_dim, self.embed_dim))
                for proj, w in zip(projections, packed.chunk(3)):
                    proj.weight.copy_(w)
            else:
                for proj in projections:
                    nn.init.xavier_uniform_(proj.weight)
            for proj in (*projections, self.out_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
            for extra in (self.bias_k, self.bias_v):
                if extra is not None:
                    nn.init.xavier_normal_(extra)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> FactorizableMultiheadAttention:
        """The equivalent of ``mha``, its packed projection split into three (weights copied)."""
        weight = next(mha.parameters())
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=weight.device, dtype=weight.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        attn_mask, key_padding_mask, is_causal = self._masks(query, key, attn_mask, key_padding_mask, is_causal,
                                                             need_weights)
        out, weights = self._attend(self._heads(self.q_proj(query)), *self._keys(key, value),
                                    attn_mask, key_padding_mask, is_causal, need_weights)
        # sequence-first (L, N, E) as torch computes it: a dropout after this layer then draws the same mask
        out = self.out_proj(out.permute(2, 0, 1, 3).flatten(2))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, heads, L, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _masks(self, query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None, is_causal: bool, need_weights: bool
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """Float masks, ``attn_mask`` as (1 | N, 1 | heads, L, S), and the causal hint, as torch resolves them."""
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (n, source):
            raise RuntimeError(f"The shape of key_padding_mask is {tuple(key_padding_mask.shape)}, but should be "
                               f"{(n, source)} (batch, source length) or ({source},) for an unbatched input.")
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            return None, None, True  # SDPA applies the causal mask itself
        attn_mask = _float_mask(attn_mask, query.dtype)
        if attn_mask is not None:
            expected = (length, source) if attn_mask.dim() == 2 else (n * self.num_heads, length, source)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {expected}.")
            attn_mask = attn_mask.view(1, 1, length, source) if attn_mask.dim() == 2 else attn_mask.view(
                n, self.num_heads, length, source)
        return attn_mask, key_padding_mask, False

    def _keys(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(k.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], 1, -1)], dim=1)
        k, v = self._heads(k), self._heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
        return k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None, is_causal: bool, need_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, heads, L, head_dim) attention output, and the per-head weights when asked for."""
        extra_keys = int(self.bias_k is not None) + int(self.add_zero_attn)  # always attended
        for _ in range(extra_keys):
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(k.shape[0], 1, 1, k.shape[2])
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal), None
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
        if p > 0:  # torch returns the weights as dropped out
            weights = F.dropout(weights, p)
        return weights @ v, weights


class _TransformerLayer(Unpacked):
    """Shared by the encoder and decoder layers: the original's children taken over, self-attention and the
    feed-forward block."""

    def _take(self, layer: nn.Module, names: tuple[str, ...]) -> None:
        """Share the original's children (no copy): putting the original back then undoes nothing but the swap,
        and a child factorized here is replaced in this module only."""
        for name in ("self_attn", "multihead_attn"):  # torch's order: attention first
            attn = getattr(layer, name, None)
            if attn is not None:
                setattr(self, name, unpacked(attn))
        for name in names:
            setattr(self, name, getattr(layer, name))
        self.norm_first = layer.norm_first
        self.activation = layer.activation
        self.train(layer.training)

    @classmethod
    def from_torch(cls, layer: nn.Module) -> _TransformerLayer:
        return cls(layer)

    def _sa_block(self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None,
                  is_causal: bool) -> torch.Tensor:
        out = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                             is_causal=is_causal)[0]
        return self.dropout1(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class FactorizableEncoderLayer(_TransformerLayer):
    """``nn.TransformerEncoderLayer`` without the fused inference path: attention, ``linear1`` and ``linear2`` are
    called as modules. Built from (and sharing the norms, dropouts and linears of) the layer it replaces."""

    replaces = nn.TransformerEncoderLayer

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self._take(layer, ("linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class FactorizableDecoderLayer(_TransformerLayer):
    """``nn.TransformerDecoderLayer`` with both attentions unpacked; built from the layer it replaces."""

    replaces = nn.TransformerDecoderLayer

    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self._take(layer, ("linear1", "dropout", "linear2", "norm1", "norm2", "norm3", "dropout1", "dropout2",
                           "dropout3"))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return self.norm3(x + self._ff_block(x))

    def _mha_block(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
                   padding: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        out = self.multihead_attn(x, memory, memory, attn_mask=mask, key_padding_mask=padding, is_causal=is_causal,
                                  need_weights=False)[0]
        return self.dropout2(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


#: the equivalents defined here, by the torch class each replaces (what a model file may name); the registry
#: declares them as packed types (:func:`~lrd_exp.decompose.registry.register_unpacked`)
UNPACKED: dict[type[nn.Module], type[Unpacked]] = {
    cls.replaces: cls for cls in (FactorizableMultiheadAttention, FactorizableEncoderLayer, FactorizableDecoderLayer)
}


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model``: a module shared under two names stays shared."""
    for name in [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]:
        model.set_submodule(name, new)
