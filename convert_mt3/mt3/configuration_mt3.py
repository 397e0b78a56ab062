"""MT3 model configuration: T5.1.1 with continuous (log-mel) encoder inputs and fixed sinusoids."""

from transformers import T5Config


class MT3Config(T5Config):
    r"""
    Configuration of [`MT3ForConditionalGeneration`]. Defaults are the published multi-instrument MT3
    (magenta/mt3 `gin/model.gin` + `gin/mt3.gin`).

    input_depth (`int`, defaults to 512):
        Width of one encoder input frame (number of log-mel bins) fed to `continuous_inputs_projection`.
    max_position_embeddings (`int`, defaults to 2048):
        Rows of the fixed sinusoidal position table (MT3 `layers.FixedEmbed.max_length`).
    max_target_length (`int`, defaults to 1024):
        Most tokens MT3 decodes per segment (the targets length of its feature converter); with the decoder start
        token, the model's default `generation_config.max_length`.
    z_loss (`float`, defaults to 1e-4):
        Weight of T5X's z-loss added to the cross entropy when `labels` are given (MT3 gin `Z_LOSS`).

    How many segments `generate()` decodes at once is a decoding setting: `segment_batch_size` in
    `generation_config.json` (see `generation_mt3.SEGMENT_BATCH_SIZE`).
    """

    _auto_class = "AutoConfig"  # remote code: a saved config names its class and copies its file

    model_type = "mt3"

    vocab_size: int = 1536
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None  # None: as many as num_layers
    num_heads: int = 6
    dropout_rate: float | int = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    input_depth: int = 512
    max_position_embeddings: int = 2048
    max_target_length: int = 1024
    z_loss: float = 1e-4
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        kwargs.pop("tie_word_embeddings", None)
        super().__post_init__(**kwargs)
        # MT3 has a separate `logits_dense` head: never tie it to the token embedder,
        # and never rescale decoder outputs (T5's d_model**-0.5 applies only to tied heads).
        self.tie_word_embeddings = False
        self.scale_decoder_outputs = False

    def get_text_config(self, decoder=None, encoder=None):
        """transformers sizes GenerationMixin's cache by `get_text_config(decoder=True).num_hidden_layers`, which T5's
        attribute map reads from `num_layers`, the encoder's count: with more decoder layers than encoder layers, beam
        search and sampling ran out of cache layers. The decoder's view (a copy) counts the decoder's layers."""
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and config is not self:
            config.num_layers = self.num_decoder_layers
        return config

    def to_dict(self) -> dict:
        """T5Config's, without the fields of what MT3 does not have (T5's relative position bias, its classification
        head): config.json would otherwise describe a bias that the model never computes."""
        output = super().to_dict()
        for field in ("relative_attention_num_buckets", "relative_attention_max_distance", "classifier_dropout"):
            output.pop(field, None)
        return output


__all__ = ["MT3Config"]
