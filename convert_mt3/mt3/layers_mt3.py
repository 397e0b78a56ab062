"""MT3's building blocks: the fixed sinusoid, attention, gated MLP and the encoder/decoder layers.

The stacks and the model that use them are in `modeling_mt3.py` (see its docstring for how MT3 differs from T5).
Each module may run its linears packed (`_Packable`): the batched decoder's speed-ups are choices of these modules,
not a second copy of their math.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN, NewGELUActivation
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense, T5LayerNorm

from .configuration_mt3 import MT3Config
from .generation_mt3 import MT3SlotCache


def mt3_sinusoid_table(
    max_len: int, features: int, min_scale: float = 1.0, max_scale: float = 10000.0
) -> torch.Tensor:
    """MT3 `layers.sinusoidal()`: sines in the first half of the features, cosines in the second.

    Computed in float64 numpy and rounded once to float32, like the original. The frequency step divides by
    `features // 2 - 1` (not `features // 2` as in most transformer code), which is why this is not shared
    with any transformers helper.
    """
    half = features // 2
    position = np.arange(max_len, dtype=np.float64)[:, None]  # (max_len, 1)
    scale_factor = -np.log(max_scale / min_scale) / (half - 1)
    div_term = min_scale * np.exp(np.arange(half, dtype=np.float64) * scale_factor)  # (half,)
    table = np.zeros((max_len, features), dtype=np.float32)
    table[:, :half] = np.sin(position * div_term)
    table[:, half : 2 * half] = np.cos(position * div_term)
    return torch.from_numpy(table)


class MT3SinusoidalPositions(nn.Module):
    """Fixed position table (MT3 `FixedEmbed`), a non-persistent buffer: rebuilt, never loaded or saved."""

    def __init__(self, config: MT3Config):
        super().__init__()
        self.max_len = config.max_position_embeddings
        self.features = config.d_model
        # Computed here, so a model built without weight initialisation still has it; a non-persistent buffer is
        # not in the checkpoint, so `MT3PreTrainedModel._init_weights` recomputes it after `from_pretrained` built
        # the module on the meta device.
        self.register_buffer("table", self.compute_table(), persistent=False)

    def compute_table(self) -> torch.Tensor:
        return mt3_sinusoid_table(self.max_len, self.features)

    def forward(self, start: int, length: int) -> torch.Tensor:
        """Rows `start .. start + length - 1` of the table, shape (1, length, features)."""
        if start + length > self.max_len:
            raise ValueError(
                f"MT3 has {self.max_len} positions (max_position_embeddings), "
                f"but position {start + length - 1} was requested"
            )
        return self.table[start : start + length].unsqueeze(0)


def _dropout(dropout: nn.Dropout, hidden: torch.Tensor) -> torch.Tensor:
    """`dropout(hidden)`, without the module call where it is the identity (eval mode): 50 calls a decode step."""
    return dropout(hidden) if dropout.training else hidden


def _onednn_linear():
    """oneDNN's linear on packed weights (`torch.ops.mkldnn._linear_pointwise`), or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (both ops are needed)
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class _PackedLinear:
    """Bias-free linears that read the same input, as one product: their weights concatenated along the outputs,
    in oneDNN's blocked layout on CPU (MKL's float32 GEMM runs 2-3x slower on few rows; the rounding differs from
    `nn.Linear` in the last bits only). Built from the parameters for one `generate()`, never saved."""

    def __init__(self, linears: tuple[nn.Linear, ...], onednn: bool, rows: int):
        weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of outputs, in)
        self.splits = [linear.out_features for linear in linears]
        self.onednn = _onednn_linear() if onednn else None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if self.onednn else weight

    def __call__(self, states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.onednn is None:
            out = F.linear(states, self.weight)
        else:
            out = self.onednn(states, self.weight, None, "none", [], "")
        return out.split(self.splits, dim=-1) if len(self.splits) > 1 else out


class _Packable:
    """A module whose linears may run packed (`_PackedLinear`), between `MT3ForConditionalGeneration.pack` and
    `unpack`: the speed-ups of batched decoding are choices of the modules, not a second copy of their math.

    `fusable` names groups of linears that read the same input; `_linear(group, x)` runs a group, packed or not.
    """

    fusable: dict[str, tuple[str, ...]] = {}
    packed: dict[str, _PackedLinear] | None = None

    def pack(self, onednn: bool, rows: int) -> None:
        self.packed = {
            group: _PackedLinear(tuple(getattr(self, name) for name in names), onednn, rows)
            for group, names in self.fusable.items()
        }

    def unpack(self) -> None:
        self.packed = None

    def _linear(self, group: str, states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.packed is not None:
            return self.packed[group](states)
        names = self.fusable[group]
        if len(names) == 1:
            return getattr(self, names[0])(states)
        return tuple(getattr(self, name)(states) for name in names)


class MT3Attention(_Packable, nn.Module):
    """Multi-head attention of MT3: bias-free projections, no logit scaling, no position bias.

    `num_heads * d_kv` (384 in MT3) need not equal `d_model` (512). Masks are boolean, True = attend.
    `matmul` (set by `MT3ForConditionalGeneration.pack` while `generate()` decodes, where
    `MT3GreedyPool.attends_by_matmuls` says) computes attention as two batched matmuls: for one query per row they
    read the keys/values at close to memory speed, where CPU SDPA takes ~1.3x as long.
    """

    matmul = False

    def __init__(self, config: MT3Config, layer_idx: int | None = None, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.dropout_p = config.dropout_rate  # a probability: the layers' `dropout` is an nn.Dropout
        inner_dim = config.num_heads * config.d_kv
        self.query = nn.Linear(config.d_model, inner_dim, bias=False)
        self.key = nn.Linear(config.d_model, inner_dim, bias=False)
        self.value = nn.Linear(config.d_model, inner_dim, bias=False)
        self.out = nn.Linear(inner_dim, config.d_model, bias=False)
        # cross-attention: keys/values of the encoder output once per segment, the query on every step
        qkv = {"q": ("query",), "kv": ("key", "value")} if is_cross_attention else {"qkv": ("query", "key", "value")}
        self.fusable = {**qkv, "out": ("out",)}

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        # (batch, length, heads * d_kv) -> (batch, heads, length, d_kv)
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of (batch, frames, d_model) -> each (batch, heads, frames, d_kv)."""
        key, value = self._linear("kv", encoder_states)
        return self._split_heads(key), self._split_heads(value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention, or cross-attention over `key_value_states` (the encoder output).

        `attention_mask` is boolean, broadcastable to (batch, heads, q_len, kv_len); `is_causal` asks for a plain
        causal mask (only used when `attention_mask` is None). With a `cache`, self-attention appends this step's
        keys/values, and cross-attention projects the encoder output once and reuses it on every later step.
        """
        batch, q_len, _ = hidden_states.shape
        if not self.is_cross_attention:
            query, key, value = (self._split_heads(s) for s in self._linear("qkv", hidden_states))
            if cache is not None:
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        else:
            query = self._split_heads(self._linear("q", hidden_states))  # (batch, heads, q_len, d_kv)
            if cache is not None and cache.is_updated.get(self.layer_idx, False):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                key, value = layer.keys, layer.values  # (batch, heads, frames, d_kv), projected once
            else:
                key, value = self.project_kv(key_value_states)
                if cache is not None:
                    key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True

        if isinstance(cache, MT3SlotCache) and cache.groups is not None and not self.is_cross_attention:
            # runs of rows, each over its own key length (the cache's groups): (rows, heads, 1 + ahead, d_kv)
            attn = torch.cat([self._attend(query[a:b], key[a:b, :, :n], value[a:b, :, :n], attention_mask[a:b, ..., :n])[0]
                              for a, b, n in cache.groups])
            weights = None
        else:
            attn, weights = self._attend(query, key, value, attention_mask, is_causal, output_attentions)
        attn = attn.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self._linear("out", attn), weights  # (batch, q_len, d_model)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_causal: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T) v of (batch, heads, q_len / kv_len, d_kv) -> (batch, heads, q_len, d_kv), and the weights
        (batch, heads, q_len, kv_len) when they were computed."""
        q_len = query.shape[2]
        dropout = self.dropout_p if self.training else 0.0
        weights = None
        if self.config._attn_implementation == "sdpa" and not output_attentions and not self.matmul:
            # scale=1.0: MT3's query kernel already holds the 1/sqrt(d_kv) factor.
            attn = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=dropout,
                is_causal=is_causal and attention_mask is None and q_len > 1,
                scale=1.0,
            )
        else:
            # bmm over (batch * heads) matrices: matmul on 4-d tensors adds ~10 dispatches a call (32 calls a step)
            batch, heads, _, head_dim = query.shape
            kv_len = key.shape[2]
            if key.shape[0] != batch:  # one encoder output for many queries: broadcast, as matmul did
                key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
            scores = torch.bmm(query.reshape(-1, q_len, head_dim), key.reshape(-1, kv_len, head_dim).transpose(1, 2))
            scores = scores.view(batch, heads, q_len, kv_len)
            if attention_mask is None and is_causal and q_len > 1:
                attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
            if attention_mask is not None:  # one op, no inverted mask: per layer and row group, on every step
                scores = torch.where(attention_mask, scores, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
            probs = F.dropout(weights, p=dropout, training=True) if self.training else weights
            attn = torch.bmm(probs.view(-1, q_len, kv_len), value.reshape(-1, kv_len, head_dim))
            attn = attn.view(batch, heads, q_len, head_dim)
        return attn, weights


class MT3LayerNorm(T5LayerNorm):
    """T5's RMS norm; in float32 through `F.rms_norm` (the same float32 arithmetic as T5's six ops, in fewer
    dispatches: 33 against 46 us for 18 rows on 2 CPU cores, 25 norms per decode step)."""

    def __init__(self, config: MT3Config):
        super().__init__(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


class MT3GatedMLP(_Packable, T5DenseGatedActDense):
    """T5's gated-GELU MLP, wo(gelu_new(wi_0 x) * wi_1 x) (gelu_new = flax's tanh gelu), with wi_0/wi_1 packable.

    gelu_new runs as torch's fused tanh GELU: the same formula in one kernel instead of eight (it differs from
    gelu_new's eight ops in the last bit of ~1% of values, as both do from XLA's)."""

    fusable = {"wi": ("wi_0", "wi_1"), "wo": ("wo",)}

    def __init__(self, config: MT3Config):
        super().__init__(config)
        if isinstance(self.act, NewGELUActivation):
            self.act = ACT2FN["gelu_pytorch_tanh"]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, linear = self._linear("wi", hidden_states)  # each (..., d_ff)
        return self._linear("wo", _dropout(self.dropout, self.act(gate) * linear))


class _MT3Layer(GradientCheckpointingLayer):
    """What MT3's encoder and decoder layers share: pre-norm blocks, each added to the residual stream through
    dropout, and the gated MLP that ends both."""

    def _add_mlp(self, config: MT3Config) -> None:
        self.pre_mlp_layer_norm = MT3LayerNorm(config)
        self.mlp = MT3GatedMLP(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def _attention_block(
        self, hidden_states: torch.Tensor, norm: MT3LayerNorm, attention: MT3Attention, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden + dropout(attention(norm(hidden))), and the attention weights (None unless asked for)."""
        attn, weights = attention(norm(hidden_states), **kwargs)
        return hidden_states + _dropout(self.dropout, attn), weights

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + _dropout(self.dropout, self.mlp(self.pre_mlp_layer_norm(hidden_states)))


class MT3EncoderLayer(_MT3Layer):
    """Pre-norm self-attention + gated-GELU MLP (MT3 `EncoderLayer`)."""

    def __init__(self, config: MT3Config, layer_idx: int | None = None):
        super().__init__()
        self.pre_attention_layer_norm = MT3LayerNorm(config)
        self.attention = MT3Attention(config, layer_idx=layer_idx)
        self._add_mlp(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states, weights = self._attention_block(
            hidden_states, self.pre_attention_layer_norm, self.attention,
            attention_mask=attention_mask, output_attentions=output_attentions,
        )
        return self._feed_forward(hidden_states), weights  # (batch, frames, d_model)


class MT3DecoderLayer(_MT3Layer):
    """Pre-norm causal self-attention, encoder-decoder attention and MLP (MT3 `DecoderLayer`)."""

    def __init__(self, config: MT3Config, layer_idx: int | None = None):
        super().__init__()
        self.pre_self_attention_layer_norm = MT3LayerNorm(config)
        self.self_attention = MT3Attention(config, layer_idx=layer_idx)
        self.pre_cross_attention_layer_norm = MT3LayerNorm(config)
        self.encoder_decoder_attention = MT3Attention(config, layer_idx=layer_idx, is_cross_attention=True)
        self._add_mlp(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden_states, self_weights = self._attention_block(
            hidden_states, self.pre_self_attention_layer_norm, self.self_attention,
            attention_mask=attention_mask, is_causal=is_causal, cache=cache, output_attentions=output_attentions,
        )
        hidden_states, cross_weights = self._attention_block(
            hidden_states, self.pre_cross_attention_layer_norm, self.encoder_decoder_attention,
            key_value_states=encoder_hidden_states, attention_mask=encoder_attention_mask, cache=cache,
            output_attentions=output_attentions,
        )
        return self._feed_forward(hidden_states), self_weights, cross_weights  # (batch, tokens, d_model)


def _padding_to_bool(mask: torch.Tensor) -> torch.Tensor:
    """(batch, kv_len) 1 = attend / 0 = padding -> boolean (batch, 1, 1, kv_len), True = attend."""
    return mask.bool()[:, None, None, :]


__all__ = ["MT3Attention", "MT3DecoderLayer", "MT3EncoderLayer", "MT3GatedMLP", "MT3LayerNorm", "MT3SinusoidalPositions", "mt3_sinusoid_table"]
