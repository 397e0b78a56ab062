"""PyTorch MT3: the T5.1.1 encoder-decoder of Magenta MT3 (`mt3/network.py`, `mt3/layers.py`).

MT3 differs from transformers' T5 in ways that change the numbers, so the stacks are written here while the
pieces that are identical (RMS norm, gated-GELU MLP) are reused from `transformers.models.t5`:

- the encoder reads continuous frames (log-mel) through a bias-free `continuous_inputs_projection`;
- both stacks add a fixed sinusoidal position table (MT3's own formula) instead of a relative position bias;
- the encoder masks nothing: zero-padded frames of the last segment are attended to, as in the original;
- attention logits are not scaled by 1/sqrt(d_kv) (T5X folds that into the trained query kernel);
- the LM head `logits_dense` is separate from the token embedder and its input is not rescaled.

Parameter names follow the T5X tree (`encoder.layers.{i}.attention.query` <- `encoder/layers_{i}/attention/query`).
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationConfig, GenerationMode, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
)
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense, T5LayerNorm
from transformers.utils import logging

from .configuration_mt3 import MT3Config
from .loss_mt3 import mt3_loss

logger = logging.get_logger(__name__)
# Model outputs name the KV cache `cache` in newer transformers 5.x and `past_key_values` before: use this version's.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPastAndCrossAttentions.__dataclass_fields__ else "past_key_values"


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


class MT3Attention(nn.Module):
    """Multi-head attention of MT3: bias-free projections, no logit scaling, no position bias.

    `num_heads * d_kv` (384 in MT3) need not equal `d_model` (512).
    """

    def __init__(self, config: MT3Config, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.dropout = config.dropout_rate
        inner_dim = config.num_heads * config.d_kv
        self.query = nn.Linear(config.d_model, inner_dim, bias=False)
        self.key = nn.Linear(config.d_model, inner_dim, bias=False)
        self.value = nn.Linear(config.d_model, inner_dim, bias=False)
        self.out = nn.Linear(inner_dim, config.d_model, bias=False)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        # (batch, length, heads * d_kv) -> (batch, heads, length, d_kv)
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

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

        `attention_mask` is additive, broadcastable to (batch, heads, q_len, kv_len); `is_causal` asks for a plain
        causal mask (only used when `attention_mask` is None). With a `cache`, self-attention appends this step's
        keys/values, and cross-attention projects the encoder output once and reuses it on every later step.
        """
        batch, q_len, _ = hidden_states.shape
        query = self._split_heads(self.query(hidden_states))  # (batch, heads, q_len, d_kv)

        if key_value_states is None:
            key = self._split_heads(self.key(hidden_states))
            value = self._split_heads(self.value(hidden_states))
            if cache is not None:
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        elif cache is not None and cache.is_updated.get(self.layer_idx, False):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values  # (batch, heads, frames, d_kv), projected at the first step
        else:
            key = self._split_heads(self.key(key_value_states))
            value = self._split_heads(self.value(key_value_states))
            if cache is not None:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True

        dropout = self.dropout if self.training else 0.0
        weights = None
        if self.config._attn_implementation == "sdpa" and not output_attentions:
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
            scores = torch.matmul(query, key.transpose(-1, -2))  # (batch, heads, q_len, kv_len)
            if attention_mask is not None:
                scores = scores + attention_mask
            elif is_causal and q_len > 1:
                kv_len = key.shape[-2]
                causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
                scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
            attn = torch.matmul(F.dropout(weights, p=dropout, training=self.training), value)

        attn = attn.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self.out(attn), weights  # (batch, q_len, d_model)


class MT3EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm self-attention + gated-GELU MLP (MT3 `EncoderLayer`)."""

    def __init__(self, config: MT3Config, layer_idx: int | None = None):
        super().__init__()
        self.pre_attention_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attention = MT3Attention(config, layer_idx=layer_idx)
        self.pre_mlp_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = T5DenseGatedActDense(config)  # wo(gelu_new(wi_0 x) * wi_1 x), gelu_new = flax's tanh gelu
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.attention(
            self.pre_attention_layer_norm(hidden_states),
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attn)
        hidden_states = hidden_states + self.dropout(self.mlp(self.pre_mlp_layer_norm(hidden_states)))
        return hidden_states, weights  # (batch, frames, d_model)


class MT3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm causal self-attention, encoder-decoder attention and MLP (MT3 `DecoderLayer`)."""

    def __init__(self, config: MT3Config, layer_idx: int | None = None):
        super().__init__()
        self.pre_self_attention_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.self_attention = MT3Attention(config, layer_idx=layer_idx)
        self.pre_cross_attention_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.encoder_decoder_attention = MT3Attention(config, layer_idx=layer_idx)
        self.pre_mlp_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = T5DenseGatedActDense(config)
        self.dropout = nn.Dropout(config.dropout_rate)

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
        attn, self_weights = self.self_attention(
            self.pre_self_attention_layer_norm(hidden_states),
            attention_mask=attention_mask,
            is_causal=is_causal,
            cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attn)
        attn, cross_weights = self.encoder_decoder_attention(
            self.pre_cross_attention_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attn)
        hidden_states = hidden_states + self.dropout(self.mlp(self.pre_mlp_layer_norm(hidden_states)))
        return hidden_states, self_weights, cross_weights  # (batch, tokens, d_model)


def _padding_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, kv_len) 1 = attend / 0 = padding -> additive (batch, 1, 1, kv_len)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask.bool(), torch.finfo(dtype).min
    )[:, None, None, :]


class MT3PreTrainedModel(PreTrainedModel):
    config_class = MT3Config
    config: MT3Config
    base_model_prefix = "mt3"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MT3EncoderLayer", "MT3DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """T5X initializers of MT3 (variance scaling, fan-in), and the sinusoid table.

        The query kernel gets the extra 1/sqrt(d_kv) that replaces the attention logit scaling.
        """
        factor = self.config.initializer_factor
        d_model, d_kv, heads = self.config.d_model, self.config.d_kv, self.config.num_heads
        if isinstance(module, MT3SinusoidalPositions):
            init.copy_(module.table, module.compute_table())
        elif isinstance(module, MT3Attention):
            init.normal_(module.query.weight, std=factor * (d_model * d_kv) ** -0.5)
            init.normal_(module.key.weight, std=factor * d_model**-0.5)
            init.normal_(module.value.weight, std=factor * d_model**-0.5)
            init.normal_(module.out.weight, std=factor * (heads * d_kv) ** -0.5)
        elif isinstance(module, T5DenseGatedActDense):
            init.normal_(module.wi_0.weight, std=factor * d_model**-0.5)
            init.normal_(module.wi_1.weight, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, std=factor * self.config.d_ff**-0.5)
        elif isinstance(module, T5LayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, MT3Encoder):
            init.normal_(module.continuous_inputs_projection.weight, std=factor * self.config.input_depth**-0.5)
        elif isinstance(module, MT3Decoder):
            init.normal_(module.token_embedder.weight, std=factor)
            init.normal_(module.logits_dense.weight, std=factor * d_model**-0.5)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: `[decoder_start] + labels[:-1]`, with -100 replaced by the pad id."""
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None or pad is None:
            raise ValueError("config.decoder_start_token_id and config.pad_token_id must be set to shift labels")
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, pad)


class MT3Encoder(nn.Module):
    """Continuous-input encoder (MT3 `Encoder`): frames -> projection + sinusoids -> layers -> `encoder_norm`."""

    main_input_name = "input_features"

    def __init__(self, config: MT3Config):
        super().__init__()
        self.config = config
        self.continuous_inputs_projection = nn.Linear(config.input_depth, config.d_model, bias=False)
        self.position_embedding = MT3SinusoidalPositions(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.layers = nn.ModuleList([MT3EncoderLayer(config, layer_idx=i) for i in range(config.num_layers)])
        self.encoder_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """`input_features` (batch, frames, input_depth) -> (batch, frames, d_model).

        MT3 masks no frame; pass `attention_mask` (batch, frames) only to deviate from the original on purpose.
        """
        if input_features.dim() != 3 or input_features.shape[-1] != self.config.input_depth:
            raise ValueError(
                f"Expected `input_features` of shape (batch, frames, {self.config.input_depth}), "
                f"found {tuple(input_features.shape)}"
            )
        dtype = self.continuous_inputs_projection.weight.dtype
        hidden = self.continuous_inputs_projection(input_features.to(dtype))  # (batch, frames, d_model)
        hidden = self.dropout(hidden + self.position_embedding(0, hidden.shape[1]).to(dtype))
        mask = None if attention_mask is None else _padding_to_additive(attention_mask, dtype)

        all_hidden = (hidden,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layers:
            hidden, weights = layer(hidden, attention_mask=mask, output_attentions=bool(output_attentions))
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attn += (weights,)
        hidden = self.dropout(self.encoder_norm(hidden))

        out = BaseModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, attentions=all_attn)
        return out if return_dict is not False else out.to_tuple()


class MT3Decoder(nn.Module):
    """Token decoder (MT3 `Decoder`); also holds the LM head `logits_dense`, as in the T5X parameter tree."""

    main_input_name = "input_ids"

    def __init__(self, config: MT3Config):
        super().__init__()
        self.config = config
        self.token_embedder = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = MT3SinusoidalPositions(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.layers = nn.ModuleList(
            [MT3DecoderLayer(config, layer_idx=i) for i in range(config.num_decoder_layers)]
        )
        self.decoder_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.logits_dense = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def _self_attention_mask(
        self, padding_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(additive mask or None, is_causal). The common cases need no mask tensor at all."""
        if padding_mask is None:
            if q_len == 1:
                return None, False  # one new token sees every cached one
            if past_len == 0:
                return None, True  # plain causal: SDPA's fused path
        kv_len = past_len + q_len
        positions = torch.arange(kv_len, device=device)
        allowed = positions[None, :] <= positions[past_len:, None]  # (q_len, kv_len)
        allowed = allowed[None, None]  # (1, 1, q_len, kv_len)
        if padding_mask is not None:
            if padding_mask.shape[-1] != kv_len:
                raise ValueError(
                    f"`decoder_attention_mask` must cover past and new tokens ({kv_len}), "
                    f"found {padding_mask.shape[-1]}"
                )
            allowed = allowed & padding_mask.bool()[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min), False

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`input_ids` (batch, tokens) -> hidden states after `decoder_norm` (batch, tokens, d_model)."""
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif cache is not None and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        if cache is not None and cache.self_attention_cache.is_compileable:
            # A static cache returns all its (partly empty) slots, which would need a mask on every step.
            raise ValueError(
                "MT3 decodes with a DynamicCache; static caches (cache_implementation='static') are not supported"
            )
        past_len = cache.get_seq_length() if cache is not None else 0

        dtype = self.token_embedder.weight.dtype
        q_len = input_ids.shape[1]
        hidden = self.token_embedder(input_ids)  # (batch, tokens, d_model), no sqrt(d_model) scaling in MT3
        if position_ids is None:
            positions = self.position_embedding(past_len, q_len)  # (1, tokens, d_model)
        else:
            positions = self.position_embedding.table[position_ids]
        hidden = self.dropout(hidden + positions.to(dtype))

        self_mask, is_causal = self._self_attention_mask(attention_mask, q_len, past_len, dtype, hidden.device)
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = _padding_to_additive(encoder_attention_mask, dtype)

        all_hidden = (hidden,) if output_hidden_states else None
        all_self = () if output_attentions else None
        all_cross = () if output_attentions else None
        for layer in self.layers:
            hidden, self_weights, cross_weights = layer(
                hidden,
                encoder_hidden_states,
                attention_mask=self_mask,
                is_causal=is_causal,
                encoder_attention_mask=cross_mask,
                cache=cache,
                output_attentions=output_attentions,
            )
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_self += (self_weights,)
                all_cross += (cross_weights,)
        hidden = self.dropout(self.decoder_norm(hidden))

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden,
            **{CACHE_FIELD: cache if use_cache else None},
            hidden_states=all_hidden,
            attentions=all_self,
            cross_attentions=all_cross,
        )


class MT3GreedyPool:
    """MT3's greedy decoding of many segments through a pool of at most `pool_size` active rows.

    Why not GenerationMixin's greedy loop: it keeps every row of the batch until the longest segment ends (MT3
    segments end after tens to ~1000 tokens, so most rows are finished for most steps) and pays per-layer module and
    cache overhead on every step. Here a row leaves the pool at EOS or the length limit; a waiting segment takes its
    slot at once (continuous batching: it is encoded then, its cross-attention keys/values are projected once, and it
    starts at position 0 while the others go on); when nothing waits, the last active row moves into the hole, so the
    active rows are always slots `[0, active)` and finished ones cost nothing. Each row has its own position (its own
    sinusoid row and causal mask). Memory: the pool's caches, the encoder activations of the segments being admitted,
    and the output tokens, whatever the number of segments.

    The weights are fused per call from the parameters (q/k/v, wi_0/wi_1, all cross k/v), so the state dict keeps its
    names. On CPU they are also packed for oneDNN (`use_onednn`): MKL's float32 GEMM runs 2-3x slower on few rows
    (decoder steps) and on AMD CPUs; the rounding differs from `nn.Linear` in the last bits only.
    """

    # A new self-attention chunk starts where a row's length falls below this share of the chunk's longest row:
    # reading fewer masked cache slots is worth one more attention call from there on.
    chunk_ratio = 0.5

    def __init__(
        self,
        model: "MT3ForConditionalGeneration",
        pool_size: int,
        use_onednn: bool | None = None,
        matmul_attention: bool | None = None,
    ):
        if pool_size < 1:
            raise ValueError(f"`segment_batch_size` must be a positive number of rows, found {pool_size}")
        config = model.config
        self.model = model
        self.pool_size = pool_size
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.inner = config.num_heads * config.d_kv
        self.d_ff = config.d_ff
        self.eps = config.layer_norm_epsilon
        encoder, decoder = model.encoder, model.decoder
        self.dtype = decoder.token_embedder.weight.dtype
        self.device = decoder.token_embedder.weight.device
        self.act = decoder.layers[0].mlp.act  # gelu_new for MT3, the module's own formula
        self.max_positions = decoder.position_embedding.max_len
        if use_onednn is None:
            use_onednn = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and _onednn_linear()
        self._onednn = _onednn_linear() if use_onednn else None
        if matmul_attention is None:
            matmul_attention = self.device.type == "cpu" and self.dtype == torch.float32
        self.matmul_attention = matmul_attention

        with torch.no_grad():
            pack = self._pack
            self.encoder_projection = pack(encoder.continuous_inputs_projection.weight)
            self.encoder_layers = [
                (
                    layer.pre_attention_layer_norm.weight,
                    pack(torch.cat([layer.attention.query.weight, layer.attention.key.weight, layer.attention.value.weight])),
                    pack(layer.attention.out.weight),
                    layer.pre_mlp_layer_norm.weight,
                    pack(torch.cat([layer.mlp.wi_0.weight, layer.mlp.wi_1.weight])),
                    pack(layer.mlp.wo.weight),
                )
                for layer in encoder.layers
            ]
            self.encoder_norm = encoder.encoder_norm.weight
            self.layers = []
            cross_kv = []
            for layer in decoder.layers:
                sa, ca, mlp = layer.self_attention, layer.encoder_decoder_attention, layer.mlp
                self.layers.append(
                    (
                        layer.pre_self_attention_layer_norm.weight,
                        pack(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])),  # (3 * inner, d_model)
                        pack(sa.out.weight),
                        layer.pre_cross_attention_layer_norm.weight,
                        pack(ca.query.weight),
                        pack(ca.out.weight),
                        layer.pre_mlp_layer_norm.weight,
                        pack(torch.cat([mlp.wi_0.weight, mlp.wi_1.weight])),  # (2 * d_ff, d_model)
                        pack(mlp.wo.weight),
                    )
                )
                cross_kv += [ca.key.weight, ca.value.weight]
            self.cross_kv = pack(torch.cat(cross_kv))  # (layers * 2 * inner, d_model): one projection per segment
            self.embedding = decoder.token_embedder.weight
            self.positions = decoder.position_embedding.table.to(self.dtype)
            self.final_norm = decoder.decoder_norm.weight
            self.lm_head = pack(decoder.logits_dense.weight)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) weight -> what `_linear` takes: oneDNN's blocked layout, or the plain weight."""
        if self._onednn is None:
            return weight.detach()
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.pool_size)

    def _linear(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._onednn is None:
            return F.linear(hidden, weight)
        return self._onednn(hidden, weight, None, "none", [], "")

    def _rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float32:
            return F.rms_norm(hidden, weight.shape, weight, self.eps)  # bit-identical to T5LayerNorm in float32
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)  # T5LayerNorm's half-precision order
        return weight * (hidden * torch.rsqrt(variance + self.eps)).to(hidden.dtype)

    def _attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(..., q_len, d_kv) attention over (..., kv_len, d_kv), unscaled (MT3's query kernel holds 1/sqrt(d_kv)).

        On CPU in float32, two batched matmuls: for one query per row they read the keys/values at close to memory
        speed, where CPU SDPA takes ~1.3x as long (`keys` may be a strided slice of a cache: rows and heads merge in
        a view). Elsewhere SDPA, whose kernels are the fast ones for half precision and on GPUs.
        """
        if not self.matmul_attention:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=1.0)
        scores = torch.matmul(query, keys.transpose(-1, -2))  # (..., q_len, kv_len)
        if mask is not None:
            scores += mask
        return torch.matmul(scores.softmax(-1), values)

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(frames, input_depth) of one segment -> its cross keys/values (layers, 2, heads, frames, d_kv).

        `MT3Encoder.forward` with the packed weights; no mask, as in MT3.
        """
        length = frames.shape[0]
        heads, head_dim, inner, d_ff = self.heads, self.head_dim, self.inner, self.d_ff
        hidden = self._linear(frames.to(self.device, self.dtype), self.encoder_projection)  # (frames, d_model)
        hidden = hidden + self.model.encoder.position_embedding(0, length)[0].to(self.dtype)  # raises past the table
        for n1, qkv_w, out_w, n2, wi, wo in self.encoder_layers:
            qkv = self._linear(self._rms_norm(hidden, n1), qkv_w).view(length, 3, heads, head_dim).permute(1, 2, 0, 3)
            attn = self._attend(qkv[0], qkv[1], qkv[2])  # (heads, frames, d_kv)
            hidden = hidden + self._linear(attn.transpose(0, 1).reshape(length, inner), out_w)
            gate = self._linear(self._rms_norm(hidden, n2), wi)  # (frames, 2 * d_ff)
            hidden = hidden + self._linear(self.act(gate[:, :d_ff]) * gate[:, d_ff:], wo)
        encoded = self._rms_norm(hidden, self.encoder_norm)  # (frames, d_model)
        kv = self._linear(encoded, self.cross_kv)  # (frames, layers * 2 * inner)
        return kv.view(length, len(self.layers), 2, heads, head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def generate(
        self,
        input_features: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        decoder_start_token_id: int,
        logits_processor: LogitsProcessorList | None = None,
    ) -> torch.LongTensor:
        """(segments, frames, input_depth) -> (segments, 1 + longest) ids, as GenerationMixin's greedy search."""
        segments, frames = input_features.shape[0], input_features.shape[1]
        pool = min(self.pool_size, segments)
        heads, head_dim, inner, d_ff = self.heads, self.head_dim, self.inner, self.d_ff
        num_layers = len(self.layers)
        device, dtype = self.device, self.dtype
        linear, rms_norm, act, attend = self._linear, self._rms_norm, self.act, self._attend
        eos = set(eos_token_ids)
        processors = logits_processor if logits_processor else None
        min_value = torch.finfo(dtype).min

        out = torch.full((segments, max_new_tokens + 1), pad_token_id, dtype=torch.long)
        tokens = torch.full((pool, max_new_tokens + 1), decoder_start_token_id, dtype=torch.long, device=device)
        cross = torch.empty(num_layers, 2, pool, heads, frames, head_dim, dtype=dtype, device=device)
        # Self-attention cache, grown by doubling; zeros, so the masked slots never hold NaN.
        capacity = min(max_new_tokens, 64)
        cache = torch.zeros(num_layers, 2, pool, heads, capacity, head_dim, dtype=dtype, device=device)
        key_positions = torch.arange(max_new_tokens, device=device)

        for slot in range(pool):
            cross[:, :, slot] = self._encode(input_features[slot])
        # Rows stay in admission order, so positions never increase along the pool: the self-attention can then
        # run over chunks of rows, each only as long as its oldest row (no reading of masked cache slots).
        segment_of = list(range(pool))  # segment decoded in each row
        position = [0] * pool  # position of each row's current input token = tokens generated so far
        next_segment, active, generated = pool, pool, 0
        position_t = torch.zeros(pool, dtype=torch.long, device=device)
        rows = torch.arange(pool, device=device)

        while active:
            longest = position[0]
            if longest >= self.max_positions:
                raise ValueError(
                    f"MT3 has {self.max_positions} positions (max_position_embeddings), "
                    f"but position {longest} was requested"
                )
            if longest >= capacity:
                capacity = min(max_new_tokens, 2 * capacity)
                grown = cache.new_zeros(num_layers, 2, pool, heads, capacity, head_dim)
                grown[..., : cache.shape[-2], :] = cache
                cache = grown
            row_ids, pos = rows[:active], position_t[:active]
            chunks = []  # (first row, end row, keys, additive mask or None)
            first = 0
            while first < active:
                length = position[first] + 1
                end = first + 1
                while end < active and position[end] + 1 >= self.chunk_ratio * length:
                    end += 1
                mask = None
                if position[end - 1] + 1 != length:  # rows at different positions: each sees its own past only
                    mask = torch.zeros(end - first, 1, 1, length, dtype=dtype, device=device)
                    hidden_keys = key_positions[:length] > pos[first:end, None]  # (rows, keys)
                    mask.masked_fill_(hidden_keys[:, None, None, :], min_value)
                chunks.append((first, end, length, mask))
                first = end

            current = tokens[:active].gather(1, pos[:, None])[:, 0]  # (active,)
            hidden = self.embedding[current] + self.positions[pos]  # (active, d_model)
            for i, (n1, qkv_w, o1, n2, q2, o2, n3, wi, wo) in enumerate(self.layers):
                qkv = linear(rms_norm(hidden, n1), qkv_w).view(active, 3, heads, head_dim)
                layer_cache = cache[i]  # (2, pool, heads, capacity, d_kv)
                layer_cache[:, row_ids, :, pos] = qkv[:, 1:]  # this step's key and value of every row
                query = qkv[:, 0, :, None]  # (active, heads, 1, d_kv)
                parts = [
                    attend(query[first:end], layer_cache[0, first:end, :, :length], layer_cache[1, first:end, :, :length], mask)
                    for first, end, length, mask in chunks
                ]
                attn = parts[0] if len(parts) == 1 else torch.cat(parts)
                hidden = hidden + linear(attn.view(active, inner), o1)
                query = linear(rms_norm(hidden, n2), q2).view(active, heads, 1, head_dim)
                attn = attend(query, cross[i, 0, :active], cross[i, 1, :active])
                hidden = hidden + linear(attn.view(active, inner), o2)
                gate = linear(rms_norm(hidden, n3), wi)  # (active, 2 * d_ff)
                hidden = hidden + linear(act(gate[:, :d_ff]) * gate[:, d_ff:], wo)
            logits = linear(rms_norm(hidden, self.final_norm), self.lm_head)  # (active, vocab)

            if processors is not None:
                logits = self._process(processors, logits.float(), tokens, position[:active])
            next_tokens = logits.argmax(-1)
            position_t[:active] += 1
            tokens[row_ids, position_t[:active]] = next_tokens
            for row in range(active):
                position[row] += 1

            finished = [
                row
                for row, token in enumerate(next_tokens.tolist())
                if token in eos or position[row] >= max_new_tokens
            ]
            if not finished:
                continue
            for row in finished:
                out[segment_of[row], : position[row] + 1] = tokens[row, : position[row] + 1]
                generated = max(generated, position[row])
            # Drop the finished rows, keeping the order of the others: rows after the first finished one move up,
            # each copying only its own filled cache slots (rows move to lower slots, so no source is overwritten
            # before it is read).
            done = set(finished)
            kept = [row for row in range(finished[0], active) if row not in done]
            for slot, row in enumerate(kept, start=finished[0]):
                filled = position[row] + 1
                cache[:, :, slot, :, :filled] = cache[:, :, row, :, :filled]
                cross[:, :, slot] = cross[:, :, row]
                tokens[slot, :filled] = tokens[row, :filled]
                segment_of[slot], position[slot] = segment_of[row], position[row]
            active -= len(finished)
            position_t[:active] = torch.tensor(position[:active], device=device)
            while active < pool and next_segment < segments:  # waiting segments join at the end, at position 0
                cross[:, :, active] = self._encode(input_features[next_segment])
                tokens[active, 0] = decoder_start_token_id
                position_t[active] = 0
                segment_of[active], position[active] = next_segment, 0
                next_segment += 1
                active += 1
        return out[:, : 1 + generated]

    @staticmethod
    def _process(
        processors: LogitsProcessorList, scores: torch.Tensor, tokens: torch.Tensor, positions: list[int]
    ) -> torch.Tensor:
        """Apply the processors to the active rows: one call per group of rows with the same length, since
        `input_ids` must be rectangular."""
        groups: dict[int, list[int]] = {}
        for slot, pos in enumerate(positions):
            groups.setdefault(pos, []).append(slot)
        if len(groups) == 1:
            return processors(tokens[: len(positions), : positions[0] + 1], scores)
        for pos, slots in groups.items():
            index = torch.tensor(slots, device=scores.device)
            scores[index] = processors(tokens[index, : pos + 1], scores[index])
        return scores


def _onednn_linear():
    """oneDNN's linear on packed weights (`torch.ops.mkldnn._linear_pointwise`), or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (both ops are needed)
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class MT3ForConditionalGeneration(MT3PreTrainedModel, GenerationMixin):
    """MT3: log-mel segments (batch, 256, 512) -> event tokens; `generate(input_features=x)` is MT3's greedy decode."""

    def __init__(self, config: MT3Config):
        super().__init__(config)
        self.encoder = MT3Encoder(config)
        self.decoder = MT3Decoder(config)
        self.post_init()
        # MT3 decodes greedily up to the targets length; kept in generation_config.json by `save_pretrained`.
        self.generation_config.update(
            decoder_start_token_id=config.decoder_start_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            max_new_tokens=config.max_target_length,
            num_beams=1,
            do_sample=False,
        )

    def get_encoder(self, modality: str | None = None) -> MT3Encoder:
        return self.encoder

    def get_decoder(self) -> MT3Decoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.token_embedder

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.token_embedder = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.logits_dense

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder.logits_dense = value

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput | tuple:
        """
        input_features (batch, frames, input_depth): log-mel frames of audio segments (unused with `encoder_outputs`).
        attention_mask (batch, frames): optional frame mask; MT3 itself masks nothing, so leave it None for parity.
        decoder_input_ids (batch, tokens): starts with `decoder_start_token_id` (0); made from `labels` if absent.
        cache: `EncoderDecoderCache` of earlier steps (`past_key_values` is accepted as an alias).
        labels (batch, tokens): targets of the loss (cross entropy + `config.z_loss` z-loss, see `loss_mt3.py`),
            -100 = ignored.
        """
        if cache is None:
            cache = past_key_values
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            use_cache = False
        use_cache = use_cache if use_cache is not None else self.config.use_cache

        if encoder_outputs is None:
            if input_features is None:
                raise ValueError("Pass `input_features` (batch, frames, input_depth) or `encoder_outputs`")
            encoder_outputs = self.encoder(
                input_features,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )

        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Pass `decoder_input_ids` or `labels`")
            decoder_input_ids = self._shift_right(labels)

        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            attention_mask=decoder_attention_mask,
            encoder_attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            position_ids=decoder_position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.decoder.logits_dense(decoder_outputs.last_hidden_state)  # (batch, tokens, vocab)

        loss = None
        if labels is not None:
            loss, _, _ = mt3_loss(logits, labels.to(logits.device), self.config.z_loss)

        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(decoder_outputs, CACHE_FIELD)},
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | list | None = None,
        segment_batch_size: int | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Greedy decoding of all segments: `generate(input_features=x)`, x (segments, frames, input_depth).

        Plain greedy search (MT3's own decoding, with optional `logits_processor`) runs in `MT3GreedyPool`: at most
        `segment_batch_size` segments (default `config.segment_batch_size`) are decoded at once and a finished one
        makes room for the next. It returns what `GenerationMixin.generate` returns: (segments, 1 + longest) ids,
        decoder start first, EOS then padding after each finished row. Everything else (beam search, sampling,
        scores / dict outputs, streamers, assistants, `use_cache=False`, masks, ...) goes to `GenerationMixin`.
        """
        # The processor's output also holds each segment's start time, which only decoding to notes needs:
        # accept it so that `model.generate(**processor(audio=...))` works.
        kwargs.pop("segment_start_times", None)
        features = kwargs.get(self.main_input_name, inputs)
        if isinstance(features, torch.Tensor) and features.dim() == 3 and features.shape[0] == 0:
            # silence of length 0: no segment to decode (GenerationMixin cannot take an empty batch)
            config = generation_config or self.generation_config
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
            return torch.full((0, 1), start, dtype=torch.long, device=features.device)
        fast = self._fast_greedy_settings(inputs, generation_config, kwargs)
        if fast is None:
            return super().generate(
                inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
            )
        features, max_new_tokens, eos, pad, start = fast
        if segment_batch_size is None:
            segment_batch_size = getattr(generation_config, "segment_batch_size", None)
        if segment_batch_size is None:
            segment_batch_size = getattr(self.generation_config, "segment_batch_size", None)
        if segment_batch_size is None:
            segment_batch_size = self.config.segment_batch_size
        if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
            logits_processor = LogitsProcessorList(logits_processor)
        return MT3GreedyPool(self, segment_batch_size).generate(
            features, max_new_tokens, eos, pad, start, logits_processor=logits_processor
        )

    def _fast_greedy_settings(
        self, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, kwargs: dict
    ) -> tuple[torch.Tensor, int, list[int], int, int] | None:
        """(features, max_new_tokens, eos ids, pad id, start id) when `MT3GreedyPool` reproduces
        `GenerationMixin`'s greedy search for these arguments, else None."""
        rest = dict(kwargs)
        features = rest.pop(self.main_input_name, None)
        if (inputs is None) == (features is None) or self.training:
            return None
        features = inputs if features is None else features
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[0] == 0:
            return None
        # arguments of GenerationMixin.generate that select other machinery
        for name in ("stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer",
                     "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "trust_remote_code",
                     "tokenizer", "assistant_tokenizer"):
            if rest.get(name) is not None:
                return None
        has_default_max_length = (
            rest.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        config, model_kwargs = self._prepare_generation_config(generation_config, **rest)
        if model_kwargs or config.get_generation_mode() != GenerationMode.GREEDY_SEARCH:
            return None  # masks, encoder outputs, decoder prompts, ...; beams, sampling, assistants
        neutral = {
            "use_cache": (True, None),
            "num_return_sequences": (1, None),
            "return_dict_in_generate": (False, None),
            "output_scores": (False, None),
            "output_logits": (False, None),
            "output_attentions": (False, None),
            "output_hidden_states": (False, None),
            "min_length": (0, None),
            "repetition_penalty": (1.0, None),
            "encoder_repetition_penalty": (1.0, None),
            "no_repeat_ngram_size": (0, None),
            "encoder_no_repeat_ngram_size": (0, None),
            "guidance_scale": (1.0, None),
            "renormalize_logits": (False, None),
            "remove_invalid_values": (False, None),
            "token_healing": (False, None),
            "use_mtp": (False, None),
        }
        for name, allowed in neutral.items():
            if getattr(config, name, None) not in allowed:
                return None
        for name in ("min_new_tokens", "max_time", "stop_strings", "bad_words_ids", "forced_bos_token_id",
                     "forced_eos_token_id", "exponential_decay_length_penalty", "suppress_tokens",
                     "begin_suppress_tokens", "sequence_bias", "watermarking_config", "cache_implementation",
                     "dola_layers", "prefill_chunk_size"):
            if getattr(config, name, None) is not None:
                return None

        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        if start is None:
            return None  # GenerationMixin raises the error
        # GenerationMixin._prepare_generated_length: max_new_tokens wins; a default max_length counts new tokens
        if config.max_new_tokens is not None:
            if not has_default_max_length and config.max_length is not None:
                logger.warning_once(
                    f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` (={config.max_length}) are "
                    "set; `max_new_tokens` takes precedence."
                )
            max_new_tokens = config.max_new_tokens
        elif has_default_max_length:
            max_new_tokens = min(config.max_length + 1, self.config.max_position_embeddings) - 1
        else:
            max_new_tokens = config.max_length - 1
        if max_new_tokens < 1:
            return None
        return features, max_new_tokens, eos, pad, start


__all__ = ["MT3PreTrainedModel", "MT3ForConditionalGeneration", "MT3GreedyPool", "mt3_sinusoid_table"]
