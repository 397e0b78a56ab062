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

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerateEncoderDecoderOutput, GenerationConfig, LogitsProcessorList
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
)
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense, T5LayerNorm
from transformers.utils import logging

from .configuration_mt3 import MT3Config
from .generation_mt3 import (
    DRAFT_TOKENS,
    EOS_CHECK_INTERVAL,
    FAST_GREEDY_SETTINGS,
    POOL_SETTINGS,
    SEGMENT_BATCH_SIZE,
    MT3GreedyPool,
    MT3SlotCache,
    row_independent,
)
from .layers_mt3 import (
    MT3Attention,
    MT3DecoderLayer,
    MT3EncoderLayer,
    MT3LayerNorm,
    MT3SinusoidalPositions,
    _Packable,
    _padding_to_bool,
    mt3_sinusoid_table,
)
from .loss_mt3 import IGNORE_INDEX, mt3_loss

logger = logging.get_logger(__name__)


class MT3PreTrainedModel(PreTrainedModel):
    """Loading, saving and weight initialisation shared by the MT3 models (transformers' PreTrainedModel)."""

    config_class = MT3Config
    _auto_class = "AutoModel"  # remote code: a saved model copies its code and names it in config.json
    config: MT3Config
    base_model_prefix = "mt3"
    main_input_name = "input_features"
    input_modalities = ("audio",)
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

    def _check_label_ids(self, labels: torch.Tensor) -> None:
        """Label ids must be in the vocabulary or -100: the embedding and the loss would fail deep inside otherwise
        (on CUDA with a device-side assert). Reads one flag back from the device; skipped while compiling and for
        tensors without data."""
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"Expected integer label ids (torch.long); found {labels.dtype}.")
        if labels.device.type == "meta" or torch.compiler.is_compiling():
            return
        outside = (labels >= self.config.vocab_size) | ((labels < 0) & (labels != IGNORE_INDEX))
        if outside.any():
            raise ValueError(
                f"Expected label ids in [0, {self.config.vocab_size}) or {IGNORE_INDEX}; found {int(labels[outside][0])}."
            )

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: `[decoder_start] + labels[:-1]`, with -100 replaced by the pad id."""
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None or pad is None:
            raise ValueError("config.decoder_start_token_id and config.pad_token_id must be set to shift labels")
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


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
        self.encoder_norm = MT3LayerNorm(config)

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
        _check_input_features(input_features, self.config.input_depth, "model")
        dtype = self.continuous_inputs_projection.weight.dtype
        hidden = self.continuous_inputs_projection(input_features.to(dtype))  # (batch, frames, d_model)
        hidden = self.dropout(hidden + self.position_embedding(0, hidden.shape[1]).to(dtype))
        mask = None if attention_mask is None else _padding_to_bool(attention_mask)

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


class MT3Decoder(_Packable, nn.Module):
    """Token decoder (MT3 `Decoder`); also holds the LM head `logits_dense`, as in the T5X parameter tree."""

    main_input_name = "input_ids"
    fusable = {"logits": ("logits_dense",)}

    def __init__(self, config: MT3Config):
        super().__init__()
        self.config = config
        self.token_embedder = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = MT3SinusoidalPositions(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.layers = nn.ModuleList(
            [MT3DecoderLayer(config, layer_idx=i) for i in range(config.num_decoder_layers)]
        )
        self.decoder_norm = MT3LayerNorm(config)
        self.logits_dense = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head. Under autocast in float32: the mixed mode keeps the logits (and so the argmax) in float32."""
        if torch.is_autocast_enabled(hidden.device.type):
            with torch.autocast(hidden.device.type, enabled=False):
                return F.linear(hidden.float(), self.logits_dense.weight.float())
        return self._linear("logits", hidden)

    @staticmethod
    def _self_attention_mask(
        padding_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask or None, is_causal). The common cases need no mask tensor at all."""
        if padding_mask is None:
            if q_len == 1:
                return None, False  # one new token sees every cached one
            if past_len == 0:
                return None, True  # plain causal: SDPA's fused path
        kv_len = past_len + q_len
        positions = torch.arange(kv_len, device=device)
        allowed = (positions[None, :] <= positions[past_len:, None])[None, None]  # (1, 1, q_len, kv_len)
        if padding_mask is not None:
            if padding_mask.shape[-1] != kv_len:
                raise ValueError(
                    f"`decoder_attention_mask` must cover past and new tokens ({kv_len}), "
                    f"found {padding_mask.shape[-1]}"
                )
            allowed = allowed & _padding_to_bool(padding_mask)
        return allowed, False

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`input_ids` (batch, tokens) -> hidden states after `decoder_norm` (batch, tokens, d_model).

        `encoder_hidden_states` may be None when `cache` already holds the cross-attention keys/values. With an
        `MT3SlotCache`, every row is at its own position and sees only its own past (the cache gives both).
        """
        q_len = input_ids.shape[1]
        dtype = self.token_embedder.weight.dtype
        if isinstance(cache, MT3SlotCache):  # the scheduler keeps positions within the table
            self_mask, is_causal = cache.begin_step(), False
            positions = self.position_embedding.table[cache.steps]  # (rows, 1 + ahead, d_model)
        else:
            past_len = cache.get_seq_length() if cache is not None else 0
            if position_ids is None:
                positions = self.position_embedding(past_len, q_len)  # (1, tokens, d_model); raises past the table
            else:
                positions = self.position_embedding.table[position_ids]
            self_mask, is_causal = self._self_attention_mask(attention_mask, q_len, past_len, input_ids.device)
        hidden = self.token_embedder(input_ids)  # (batch, tokens, d_model), no sqrt(d_model) scaling in MT3
        hidden = self.dropout(hidden + positions.to(dtype))
        cross_mask = None if encoder_attention_mask is None else _padding_to_bool(encoder_attention_mask)

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
        # positional: the cache field is named differently across transformers 5.x releases
        return BaseModelOutputWithPastAndCrossAttentions(hidden, cache, all_hidden, all_self, all_cross)


class MT3ForConditionalGeneration(MT3PreTrainedModel, GenerationMixin):
    """MT3: log-mel segments (batch, frames, input_depth; mt3: 256 x 512) -> event tokens;
    `generate(input_features=x)` is MT3's greedy decode."""

    def __init__(self, config: MT3Config):
        super().__init__(config)
        self.encoder = MT3Encoder(config)
        self.decoder = MT3Decoder(config)
        self.post_init()
        # MT3 decodes greedily up to the targets length; kept in generation_config.json by `save_pretrained`. As
        # `max_length` (the decoder start + the targets), not `max_new_tokens`: a `max_new_tokens` in the folder
        # would win over every `max_length` a caller passes (Seq2SeqTrainer's `generation_max_length`), and without
        # a `max_length` Seq2SeqTrainer writes the library's default, 20, into the model's generation config.
        self.generation_config.update(
            decoder_start_token_id=config.decoder_start_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            max_length=config.max_target_length + 1,
            num_beams=1,
            do_sample=False,
        )
        self.generation_config.segment_batch_size = dict(SEGMENT_BATCH_SIZE)
        self.generation_config.eos_check_interval = dict(EOS_CHECK_INTERVAL)
        self.generation_config.draft_tokens = dict(DRAFT_TOKENS)
        self.generation_config.cuda_graphs = True  # CUDA only (ignored elsewhere): same ids, faster
        # No longer the model config's copy: with the flag, loading generation_config.json drops the keys that
        # GenerationConfig does not define (segment_batch_size, cuda_graphs, eos_check_interval, draft_tokens, and
        # draft_shift_ids, which the converter sets from the tokenizer's vocabulary).
        self.generation_config._from_model_config = False

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
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput | tuple:
        """
        input_features (batch, frames, input_depth): log-mel frames of audio segments (unused with `encoder_outputs`).
        attention_mask (batch, frames): optional frame mask; MT3 itself masks nothing, so leave it None for parity.
        decoder_input_ids (batch, tokens): starts with `decoder_start_token_id` (0); made from `labels` if absent.
        cache: `EncoderDecoderCache` of earlier steps (`past_key_values` is accepted as an alias).
        labels (batch, tokens): targets for the cross-entropy loss, -100 = ignored.
        num_items_in_batch: counted label tokens of the whole optimizer step (`Trainer` passes it under gradient
        accumulation): the loss is the sum over this batch divided by it (see `mt3_loss`).
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

        segments = encoder_outputs.last_hidden_state.shape[0]
        for name, ids in (("labels", labels), ("decoder_input_ids", decoder_input_ids)):
            if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2):
                found = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"Expected {name} as a torch tensor (segments, tokens); found {found}.")
            if ids is not None and ids.shape[0] != segments:  # attention would broadcast one segment over the rows
                raise ValueError(
                    f"Expected one row of {name} per segment: found {ids.shape[0]} rows for {segments} segments."
                )
        if labels is not None:
            self._check_label_ids(labels)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError(
                    "Pass `decoder_input_ids` or `labels` to the forward pass (Trainer's label smoothing and "
                    "`compute_loss_func` take the labels out first: collate with "
                    "`processor.collate(..., model=model)`); to transcribe, call `generate()` or "
                    'pipeline("music-transcription", ...) (the "automatic-speech-recognition" pipeline cannot '
                    "decode MT3)"
                )
            decoder_input_ids = self._shift_right(labels)

        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif cache is not None and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        if cache is not None and cache.self_attention_cache.is_compileable:
            # A static cache returns all its (partly empty) slots, which would need a mask on every step.
            raise ValueError(
                "MT3 decodes with a DynamicCache; static caches (cache_implementation='static') are not supported"
            )
        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            attention_mask=decoder_attention_mask,
            encoder_attention_mask=attention_mask,
            cache=cache if use_cache else None,
            position_ids=decoder_position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.decoder.logits(decoder_outputs.last_hidden_state)  # (batch, tokens, vocab)

        loss = None
        if labels is not None:
            loss, _, _ = mt3_loss(
                logits, labels.to(logits.device), self.config.z_loss, num_items_in_batch=num_items_in_batch
            )

        # positional: the cache field is named differently across transformers 5.x releases
        output = Seq2SeqLMOutput(
            loss,
            logits,
            cache if use_cache else None,
            decoder_outputs.hidden_states,
            decoder_outputs.attentions,
            decoder_outputs.cross_attentions,
            encoder_outputs.last_hidden_state,
            encoder_outputs.hidden_states,
            encoder_outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)

    def pack(self, rows: int, onednn: bool, matmul_attention: bool, fuse: bool = True) -> None:
        """Until `unpack()`, the decoder's attention runs as matmuls if `matmul_attention`, and if `fuse` its
        linears that read the same input run as one product (q/k/v, wi_0/wi_1, cross k/v), in oneDNN's layout if
        `onednn`. The parameters are unchanged: the packs are built from them here (`rows`: the expected rows per
        product). The encoder is left as it is: its products have hundreds of rows, where the defaults are faster
        (CPU: 30 segments encoded in 2.5 s as they are, 3.5 s packed with matmul attention)."""
        with torch.no_grad():
            for module in self.decoder.modules():
                if isinstance(module, _Packable) and fuse:
                    module.pack(onednn, rows)
                if isinstance(module, MT3Attention):
                    module.matmul = matmul_attention

    def unpack(self) -> None:
        for module in self.decoder.modules():
            if isinstance(module, _Packable):
                module.unpack()
            if isinstance(module, MT3Attention):
                module.matmul = False

    def transcription_pipeline(self, processor=None, **kwargs):
        """This model as it is in memory (cast, moved, fine-tuned) in its music-transcription pipeline, which
        `pipeline(model=<a model object>)` cannot find (a custom task is read from a folder's config.json).
        `processor`: by default the one saved with the model (from `name_or_path`, by this code's own class);
        `kwargs` go to the pipeline (`batch_size`, `programs`, `return_midi`, ...); the model stays on its device
        unless `device=` says otherwise. Importing the pipeline here also makes `save_pretrained` copy
        pipeline_mt3.py (transformers copies the model file's relative imports), which config.json's
        `custom_pipelines` names."""
        from .pipeline_mt3 import MT3TranscriptionPipeline
        from .processing_mt3 import MT3Processor

        if processor is None:
            if not self.name_or_path:
                raise ValueError("This model was not loaded from a folder or repo: pass `processor=`")
            processor = MT3Processor.from_pretrained(self.name_or_path)
        if getattr(self, "hf_device_map", None) is None:
            kwargs.setdefault("device", self.device)  # the pipeline would move it to the first GPU
        return MT3TranscriptionPipeline(
            model=self, tokenizer=processor.tokenizer, feature_extractor=processor.feature_extractor,
            task="music-transcription", **kwargs,
        )

    @property
    def default_segment_batch_size(self) -> int:
        """Segments `generate()` decodes at once on this model's device (generation_config.json, per device type)."""
        return _per_device(getattr(self.generation_config, "segment_batch_size", None), SEGMENT_BATCH_SIZE,
                           self.device.type)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | list | None = None,
        segment_batch_size: int | None = None,
        cuda_graphs: bool | None = None,
        eos_check_interval: int | None = None,
        draft_tokens: int | None = None,
        draft_shift_ids: list[int] | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Greedy decoding of all segments: `generate(input_features=x)`, x (segments, frames, input_depth).

        In eval mode, when the generation settings differ from greedy search only in `FAST_GREEDY_SETTINGS` and
        the logits processors, if any, work row by row (`ROW_INDEPENDENT_PROCESSORS`, or `row_independent = True`
        on their class), decoding runs in `MT3GreedyPool` (the model's own layers, at most `segment_batch_size` segments at
        once, a finished one making room for the next) and returns what `GenerationMixin.generate` returns: (segments, 1 + longest)
        ids, decoder start first, EOS then padding after each finished row (the same ids in float32; in half
        precision, other kernels round differently and may flip near-ties). Anything else goes to
        `GenerationMixin.generate` (beam search, sampling, dict outputs, streamers, masks, ...).
        On CUDA the decode steps replay as CUDA graphs unless `cuda_graphs=False` (or false in the generation
        config); `eos_check_interval=k` looks for finished segments every k steps only (default: 8 on CUDA, 1
        elsewhere, generation_config.json). `draft_tokens=k`: once few segments are left, each guesses its next k
        ids from its own earlier ones and checks them in one step (the same ids in fewer steps; default 4 on CPU,
        0 on CUDA, MPS and XPU; devices not named in these settings take the CPU's, as for `segment_batch_size`);
        `draft_shift_ids=[first, last]`, the time shifts' ids (the converter writes them to generation_config.json),
        lets a guessed loop move on in time.
        """
        if self.training:  # GenerationMixin does not switch to eval either; Trainer.train() leaves train mode on
            logger.warning_once(
                "generate() on a model in train mode: dropout is active, so the ids vary from call to call; call "
                "model.eval() first"
            )
        # The processor's output also holds each segment's start time (and, for a list of clips, their segment
        # counts), which only decoding to notes needs: accept them so that `model.generate(**processor(audio=...))`
        # works.
        kwargs.pop("segment_start_times", None)
        kwargs.pop("segments_per_clip", None)
        _replace_folder_limit(generation_config, kwargs)
        features = inputs if kwargs.get(self.main_input_name) is None else kwargs[self.main_input_name]
        if features is None and kwargs.get("encoder_outputs") is None:
            found = "`input_ids` (token ids are the output, not the input)" if "input_ids" in kwargs else "none"
            raise ValueError(
                f"generate() needs `input_features` (segments, frames, mel bins), e.g. from the processor; found {found}"
            )
        if features is not None:
            _check_input_features(features, self.config.input_depth, "generate")
            if features.shape[0] == 0:  # audio of length 0 (GenerationMixin cannot take an empty batch)
                return self._no_segments(features.device, generation_config, kwargs)
        fast = self._fast_greedy_settings(inputs, generation_config, kwargs)
        if fast is None or not row_independent(logits_processor or []):
            return super().generate(
                inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
            )
        features, max_new_tokens, eos, pad, start, configured = fast
        given = {"segment_batch_size": segment_batch_size, "cuda_graphs": cuda_graphs,
                 "eos_check_interval": eos_check_interval, "draft_tokens": draft_tokens,
                 "draft_shift_ids": draft_shift_ids}
        settings = {name: configured[name] if value is None else value for name, value in given.items()}
        if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
            logits_processor = LogitsProcessorList(logits_processor)
        return MT3GreedyPool(
            self,
            _per_device(settings["segment_batch_size"], SEGMENT_BATCH_SIZE, self.device.type),
            cuda_graphs=self._can_capture() and (settings["cuda_graphs"] is None or bool(settings["cuda_graphs"])),
            eos_check_interval=_per_device(settings["eos_check_interval"], EOS_CHECK_INTERVAL, self.device.type),
            draft_tokens=_per_device(settings["draft_tokens"], DRAFT_TOKENS, self.device.type),
            draft_shift_ids=settings["draft_shift_ids"],
        ).generate(features, max_new_tokens, eos, pad, start, logits_processor=logits_processor)

    def _no_segments(self, device: torch.device, generation_config: GenerationConfig | None, kwargs: dict):
        """What generate() returns for no segment: (0, 1) ids, or their output dict if the settings ask for one."""
        rest = {name: value for name, value in kwargs.items() if name != self.main_input_name}
        config, _ = self._prepare_generation_config(generation_config, **rest)
        config.validate()  # as GenerationMixin would
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
        ids = torch.full((0, 1), start, dtype=torch.long, device=device)
        return GenerateEncoderDecoderOutput(sequences=ids) if config.return_dict_in_generate else ids

    def _can_capture(self) -> bool:
        """CUDA graphs need the whole model on one CUDA device: not spread or offloaded by a `device_map`."""
        device_map = getattr(self, "hf_device_map", None) or {}
        return self.device.type == "cuda" and len({str(d) for d in device_map.values()}) <= 1

    def _fast_greedy_settings(
        self, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, kwargs: dict
    ) -> tuple[torch.Tensor, int, list[int], int, int, dict] | None:
        """(features, max_new_tokens, eos ids, pad id, start id, the pool's settings from the generation config:
        segment_batch_size, cuda_graphs, eos_check_interval, draft_tokens, draft_shift_ids, None where unset) when
        the settings are greedy search changed only in `FAST_GREEDY_SETTINGS` (what `MT3GreedyPool` reproduces),
        else None."""
        rest = dict(kwargs)
        features = rest.pop(self.main_input_name, None)
        if (inputs is None) == (features is None) or self.training:
            return None
        # Seq2SeqTrainer (predict_with_generate) passes the batch's labels, on which greedy ids do not depend, and
        # `synced_gpus`: True under DeepSpeed ZeRO-3 or FSDP, where every process must step with the others
        rest.pop("labels", None)
        if rest.pop("synced_gpus", None):
            return None
        features = inputs if features is None else features
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[0] == 0:
            return None
        has_default_max_length = (
            rest.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        config, model_kwargs = self._prepare_generation_config(generation_config, **rest)
        if any(value is not None for value in model_kwargs.values()):
            return None  # masks, encoder outputs, decoder prompts, streamers, stopping criteria, assistants, ...
        greedy = GenerationConfig()
        greedy.update(**greedy._get_default_generation_params(), defaults_only=True)
        defaults = greedy.to_dict()
        for name, value in config.to_dict().items():
            if name in FAST_GREEDY_SETTINGS or name.startswith("_") or name == "transformers_version":
                continue
            default = defaults.get(name)
            if value != default and not (default is None and value is False):  # an unset flag is off
                return None

        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        if start is None or isinstance(start, bool) or not isinstance(start, int):
            return None  # GenerationMixin raises the error, or takes one start id per segment
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
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            return None  # GenerationMixin takes it (5.0 as 5) or raises its error
        return features, max_new_tokens, eos, pad, start, {name: getattr(config, name, None) for name in POOL_SETTINGS}


def _replace_folder_limit(generation_config: GenerationConfig | None, kwargs: dict) -> None:
    """A call's `max_new_tokens` (a keyword, or in a GenerationConfig passed without `max_length`) replaces the
    folder's `max_length` in `kwargs`, where GenerationMixin would keep both and warn that both are set; an explicit
    `max_length=None` leaves the folder's."""
    if "max_length" in kwargs and kwargs["max_length"] is None:
        del kwargs["max_length"]
    new_tokens = kwargs.get("max_new_tokens")
    if new_tokens is None and generation_config is not None and generation_config.max_length is None:
        new_tokens = generation_config.max_new_tokens
    if new_tokens is not None and "max_length" not in kwargs:
        kwargs["max_length"] = None


def _check_input_features(features, input_depth: int, caller: str) -> None:
    """A ValueError unless `features` is a (segments, frames >= 1, input_depth) tensor, checked where the frames
    enter (`caller`: "model" or "generate"), so that a processor output given whole, numpy arrays or a wrong mel
    size are named rather than failing deep inside."""
    if hasattr(features, "keys"):  # a mapping: the processor's whole output, given as the first argument
        raise ValueError(
            f"Expected `input_features` as a torch tensor; found a {type(features).__name__} with keys "
            f"{sorted(features)}: pass its entries as keywords, `{caller}(**inputs)`"
        )
    if not isinstance(features, torch.Tensor):
        raise ValueError(
            f"Expected `input_features` as a torch tensor (segments, frames, {input_depth}); found "
            f"{type(features).__name__}: call the processor with return_tensors=\"pt\""
        )
    if features.dim() != 3 or features.shape[-1] != input_depth:
        raise ValueError(f"Expected `input_features` of shape (segments, frames, {input_depth}), found "
                         f"{tuple(features.shape)}")
    if features.shape[1] == 0 < features.shape[0]:
        raise ValueError(f"Expected segments of at least one frame; found input_features of shape "
                         f"{tuple(features.shape)}")


def _per_device(setting: int | dict | None, defaults: dict[str, int], device_type: str) -> int:
    """A `segment_batch_size` / `eos_check_interval` / `draft_tokens` setting (a number, or per device type as
    generation_config.json holds it; None: `defaults`) -> the number for this device type (other devices: the
    CPU's)."""
    if setting is None:
        setting = defaults
    if not isinstance(setting, dict):
        return setting
    return setting.get(device_type, setting.get("cpu", defaults["cpu"]))


__all__ = ["MT3PreTrainedModel", "MT3ForConditionalGeneration", "mt3_sinusoid_table"]
