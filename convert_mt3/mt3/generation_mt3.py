"""Greedy decoding of many MT3 segments at once: a slot cache and a scheduler over the model's own layers.

`MT3SlotCache` is a transformers `EncoderDecoderCache` with a fixed number of rows ("slots"), each decoding its own
segment at its own position; `MT3GreedyPool` only decides which segment runs in which row (continuous refill: a
finished segment leaves, a waiting one takes its row). All the math is `MT3Encoder` / `MT3Decoder`'s.

Why not GenerationMixin's greedy loop: it keeps every row of the batch until the longest segment ends (MT3 segments
end after tens to ~1000 tokens, so most rows would be finished for most steps), and its dynamic cache grows by one
concatenation per step and layer.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache
from transformers.generation import (
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

# The pool's own settings (generate() arguments, or keys of generation_config.json).
POOL_SETTINGS = ("segment_batch_size", "cuda_graphs", "eos_check_interval", "draft_tokens", "draft_shift_ids")
# Generation settings the fast path reproduces; any other setting that differs from greedy search's defaults sends
# `generate()` to `GenerationMixin` (a contract, not a list of what is refused).
FAST_GREEDY_SETTINGS = frozenset(
    {"max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
     *POOL_SETTINGS}
)
# Logits processors the fast path runs: each row's scores depend on that row's own ids only, so they may see the busy
# rows in groups of equal length (`MT3GreedyPool._process`), in any order. transformers' processors of that kind (these
# exact classes, not subclasses) and any processor whose class sets `row_independent = True`; any other (one that reads
# its batch index, as PrefixConstrainedLogitsProcessor's `batch_id` does, or keeps state per batch row) sends
# `generate()` to `GenerationMixin`, whose batch is every segment in order.
ROW_INDEPENDENT_PROCESSORS = frozenset({
    ExponentialDecayLengthPenalty, ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor, LogitNormalization, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor, SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor,
})


def row_independent(processors: LogitsProcessorList) -> bool:
    """Whether the fast path may run these logits processors (`ROW_INDEPENDENT_PROCESSORS`)."""
    return all(type(p) in ROW_INDEPENDENT_PROCESSORS or getattr(p, "row_independent", False) is True for p in processors)


# Rows decoded at once by default, per device type (generation_config.json `segment_batch_size`). CPU: 32 decoded a
# 60 s clip 11-12% faster than 16 in two `make bench` runs on 2 cores (row 5), for 1.1-1.3 GB peak; CUDA: 256
# decoded an hour of audio in 7.1 s with CUDA graphs, 10.2 GB peak, on an H200 (row 8; other sizes not measured).
SEGMENT_BATCH_SIZE = {"cpu": 32, "cuda": 256}
# Steps between the host's looks for finished segments, per device type (generation_config.json
# `eos_check_interval`). CUDA: 8 let the GPU run queued steps without waiting for the host; an hour of audio's
# generate() took 3%, 8% and 8% less time in three sessions on an H200 (6.60 against 7.19 s in the last), the 60 s
# clip 0.42-0.48 s against 0.44-0.50 s, the same ids. CPU: each step already waits for its kernels, nothing to gain.
EOS_CHECK_INTERVAL = {"cpu": 1, "cuda": 8}
# Ids each row guesses ahead once at most `DRAFT_ROWS` rows decode (`MT3GreedyPool._draft`), per device
# type (generation_config.json `draft_tokens`; 0: none). CPU (2 cores): golden case a repeated to 60 s, whose 30
# segments end after 46 to 1024 ids, decoded in 22.5-23.8 s with 2, 3 or 4 guesses (4 rows) against 28.6-28.9 s
# without, the same ids (two runs each, alternating in one process); with 4, its 1024-id segment takes 571 steps on
# its own, the clip 657 instead of 1024. `make bench` row 5 on that clip (whole processes, runs apart): 21.68 and
# 23.62 s, against 23.56 s in one run before drafts, a gain within this VM's run-to-run noise. With the time shifts
# moved on (`draft_shift_ids`) the clip takes 577 steps, its tail 7.6-9.0 s against 9.8-10.9 s (alternating).
# CUDA, MPS, XPU: 0 (not measured; drafts need the host to read every row's position each step, no CUDA graph, and
# integer scans, cumprod/cummax, that MPS long lacked).
DRAFT_TOKENS = {"cpu": 4, "cuda": 0, "mps": 0, "xpu": 0}
# Drafts once at most this many rows decode: the tail of a decode, where a few long segments are left and a step
# costs mostly its weights' reading and its dispatch (the 49 linears on 2 cores: ~7 ms for 1 row, ~8.5 for 5); at 8
# rows the same clip took 23.4 and 28.0 s against 22.7 and 23.8 s at 4.
DRAFT_ROWS = 4
# A CUDA decode of at most this many rows counts as small (attention through SDPA in half precision, key buckets of
# 128): the threshold lies between the two sizes measured, a 60 s clip's 30 rows and an hour's 256.
FEW_ROWS = 64


class MT3SlotLayer(CacheLayerMixin):
    """Keys and values of one attention layer for every row, (rows, heads, length, d_kv).

    Storage is preallocated for the rows; `keys` / `values` are views of its first `cache.rows` rows, so a
    row leaving (`move` the last row into its place, then one row less) copies one row, not the cache.
    Self-attention: `update` writes each row's new key/value at that row's own position and returns the first
    `cache.length` positions; storage grows by doubling. Cross-attention: `admit` writes the keys/values of newly
    admitted segments into their rows once; `update` is not used.
    """

    def __init__(self, owner: "MT3SlotCache"):
        super().__init__()
        self.owner = owner  # a cycle: `MT3SlotCache.release` frees the storage when decoding ends

    def _allocate(self, like: torch.Tensor, length: int) -> None:
        # Rows in use only: rows leave once no segment waits, so no row is admitted after a row left.
        # zeros: slots beyond a row's position are masked, and must never hold NaN (0 * NaN would leak through)
        _, heads, _, head_dim = like.shape
        self.storage = [like.new_zeros(self.owner.rows, heads, length, head_dim) for _ in range(2)]
        self.is_initialized = True
        self.view()

    def view(self) -> None:
        """`keys` / `values`: the rows in use."""
        self.keys, self.values = (storage[: self.owner.rows] for storage in self.storage)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, self.owner.capacity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """(rows, heads, 1 + cache.ahead, d_kv) of this step -> (rows, heads, cache.length, d_kv) keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.owner.write_index()  # (rows * heads * (1 + ahead),): each row's positions, as storage vectors
        head_dim = key_states.shape[-1]
        for storage, states in zip(self.storage, (key_states, value_states)):
            new = states.reshape(-1, head_dim).to(storage.dtype)  # (rows * heads * (1 + ahead), d_kv)
            storage.view(-1, head_dim).index_copy_(0, index, new)
        length = self.owner.length
        return self.keys[:, :, :length], self.values[:, :, :length]

    def admit(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cross-attention keys/values (new rows, heads, frames, d_kv) of the segments admitted into `rows`."""
        if not self.is_initialized:
            self._allocate(keys, keys.shape[2])
        self.keys[rows] = keys.to(self.keys.dtype)
        self.values[rows] = values.to(self.values.dtype)

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            old = self.storage
            self._allocate(old[0], capacity)
            for new, previous in zip(self.storage, old):
                new[:, :, : previous.shape[2]] = previous[: self.owner.rows]

    def move(self, source: int, target: int) -> None:
        if self.is_initialized:
            for storage in self.storage:
                storage[target] = storage[source]

    def clear(self, rows: torch.Tensor, length: int) -> None:
        """Zero the first `length` positions of `rows` (what their last segments wrote)."""
        if self.is_initialized:
            for storage in self.storage:
                storage[:, :, :length].index_fill_(0, rows, 0)

    def release(self) -> None:
        self.storage = self.keys = self.values = None
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length, 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    get_max_cache_shape = get_max_length  # the same, under its abstract name before transformers 5.24


class MT3SlotCache(EncoderDecoderCache):
    """Preallocated cache of `rows` rows, each at its own position; rows are admitted and removed, not appended.

    Every row in use decodes a segment. A decode step reads `length` key positions, a multiple of `bucket` (32 unless
    the pool asks for another, `MT3GreedyPool.key_bucket`): between two multiples, a step has the same shapes (a
    capturable step on GPUs). `positions` (rows,) is each row's current input position, below `max_positions` (the
    decoder's position table); a step with `ahead` > 0 also feeds each row's `ahead` drafted tokens, at the
    positions after it (`MT3GreedyPool._draft`). With `group_rows`, self-attention runs in `groups` of rows, each
    over its own longest row (`reserve`): with continuous refill, a segment just admitted sits beside one ~1000
    tokens old.
    """

    bucket = 32
    # Neighbouring groups merge when that adds at most this many row-positions of keys to read: on 2 CPU cores, a
    # group costs ~1 ms a decode step (8 groups of 4 rows against one, all at one length: +6-7 ms), a row-position
    # ~2.5 us (32 rows at 1024 against 64 positions: +78 ms).
    group_merge = 384

    def __init__(
        self,
        num_layers: int,
        rows: int,
        device: torch.device,
        max_positions: int,
        group_rows: int | None = None,
        bucket: int | None = None,
    ):
        self.rows, self.max_positions, self.group_rows = rows, max_positions, group_rows
        self.bucket = bucket or type(self).bucket
        self.capacity, self.length = 2 * self.bucket, self.bucket
        self.groups: list[tuple[int, int, int]] | None = None  # (first row, end row, key length); None: one group
        self._write_index: torch.Tensor | None = None  # `write_index`, once per step (`begin_step`)
        self.ahead, self.offsets = 0, torch.arange(1, device=device)  # `set_ahead`
        super().__init__(
            Cache(layers=[MT3SlotLayer(self) for _ in range(num_layers)]),
            Cache(layers=[MT3SlotLayer(self) for _ in range(num_layers)]),
        )
        self.is_updated = dict.fromkeys(range(num_layers), True)  # cross keys/values come from `admit`
        self.row_index = torch.arange(rows, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)

    def set_ahead(self, ahead: int) -> None:
        """The next steps feed each row's input token and `ahead` drafted ones (0: the input token only)."""
        if ahead != self.ahead:
            self.ahead, self.offsets = ahead, torch.arange(1 + ahead, device=self.positions.device)

    @property
    def slot_layers(self) -> list[MT3SlotLayer]:
        return [*self.self_attention_cache.layers, *self.cross_attention_cache.layers]

    def admit(self, rows: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]], written: int = 0) -> None:
        """New segments start at position 0 in `rows`, with their cross-attention keys/values per layer. `written`:
        how many self-attention positions the rows' last segments wrote; they are zeroed, since a masked key
        position still multiplies its value by 0, and a NaN or inf left by a segment with such features would
        leak into the next one (0 * NaN = NaN)."""
        for layer, (keys, values) in zip(self.cross_attention_cache.layers, cross):
            layer.admit(rows, keys, values)
        if written:
            for layer in self.self_attention_cache.layers:
                layer.clear(rows, min(written, self.capacity))
        self.positions[rows] = 0

    def move(self, source: int, target: int) -> None:
        """Row `source`'s segment (keys, values, position) moves to row `target`."""
        for layer in self.slot_layers:
            layer.move(source, target)
        self.positions[target] = self.positions[source]

    def shrink(self, rows: int) -> None:
        """Keep the first `rows` rows: the storage stays, `keys`/`values`/`positions` become views of fewer rows."""
        self.rows = rows
        self.row_index, self.positions = self.row_index[:rows], self.positions[:rows]
        for layer in self.slot_layers:
            if layer.is_initialized:
                layer.view()

    def release(self) -> None:
        """Free the storage now: the layers refer back to the cache, so only a later garbage collection would
        (three 60 s clips in a row peaked at 2.6 GB of memory, against 1.4 GB for one)."""
        for layer in self.slot_layers:
            layer.release()

    def reserve(self, positions: list[int]) -> None:
        """Row r is at position `positions[r]` this step: read `length` key positions (the longest row's, rounded
        up to a bucket multiple), growing the storage; with `group_rows`, `groups` are runs of that many rows with
        their own lengths, neighbours merged where one length costs little more (`group_merge`)."""
        furthest = max(positions) + self.ahead
        if furthest >= self.max_positions:
            raise ValueError(f"MT3 has {self.max_positions} positions (max_position_embeddings), but position "
                             f"{furthest} was requested")
        self.length = self.keys_for(furthest, self.bucket)
        if self.length > self.capacity:
            self.capacity = max(2 * self.capacity, self.length)
            for layer in self.self_attention_cache.layers:
                layer.grow(self.capacity)
        self.groups = None
        if self.group_rows is not None and self.rows > self.group_rows:
            groups = []
            for first in range(0, self.rows, self.group_rows):
                end = min(first + self.group_rows, self.rows)
                length = self.keys_for(max(positions[first:end]) + self.ahead, self.bucket)
                if groups:  # merged with the previous group where that reads few more keys than it saves ops
                    start, middle, previous = groups[-1]
                    longest = max(previous, length)
                    if (middle - start) * (longest - previous) + (end - middle) * (longest - length) <= self.group_merge:
                        first, length = groups.pop()[0], longest
                groups.append((first, end, length))
            self.groups = groups if len(groups) > 1 else None

    @staticmethod
    def keys_for(position: int, bucket: int) -> int:
        """Key positions a row at `position` reads: position + 1, rounded up to a multiple of `bucket`."""
        return -(-(position + 1) // bucket) * bucket

    def write_index(self) -> torch.Tensor:
        """(rows * heads * (1 + ahead),) where this step's keys/values go in the self-attention storage, seen as (rows
        * heads * capacity, d_kv) vectors: computed by the step's first layer, on the device, and used by all (one
        `index_copy_` a layer instead of an indexed assignment: fewer dispatches and copies). Unchecked on the
        device: `reserve` keeps every position below `length` <= `capacity` (a position past it would land in the
        next head's vectors)."""
        if self._write_index is None:
            heads = self.self_attention_cache.layers[0].storage[0].shape[1]
            slots = self.row_index[:, None, None] * heads + torch.arange(heads, device=self.positions.device)[:, None]
            self._write_index = (slots * self.capacity + self.steps[:, None]).view(-1)  # (rows, heads, 1 + ahead)
        return self._write_index

    def begin_step(self) -> torch.Tensor:
        """Called by the decoder at the start of every step, inside it (so a CUDA graph of the step recomputes them
        from the positions): sets `steps` (rows, 1 + ahead), the positions this step feeds, forgets the last step's
        `write_index`, and returns the self-attention mask, (rows, 1, 1 + ahead, length) boolean, True = attend:
        each position sees its own row's past and itself only."""
        self._write_index = None
        self.steps = self.positions[:, None] + self.offsets
        keys = torch.arange(self.length, device=self.positions.device)
        return (keys <= self.steps[:, :, None])[:, None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class MT3GreedyPool:
    """MT3's greedy decoding of many segments through at most `pool_size` rows of an `MT3SlotCache`.

    A row leaves at EOS or the length limit; waiting segments take the free rows at once (their encoder runs
    batched, `encoder_batch` segments at a time, on a GPU ahead of their admission (`_EncodedSegments`), and their
    cross-attention keys/values are projected once into the cache) and start at position 0 while the others go
    on. Once nothing waits, free rows leave the cache: at once without graphs, so every step computes busy rows
    only; with `cuda_graphs`, when the busy rows fit in a power of two (so few shapes are captured). Memory: the
    pool's caches, the encoder activations of `encoder_batch` segments, and the output tokens, whatever the number
    of segments. With `group_rows` (CPU default 4), self-attention runs in groups of that many rows, each over its
    own longest row rather than the oldest row of the pool.

    During decoding the model's linears run packed (`MT3ForConditionalGeneration.pack`): on CPU in oneDNN's layout
    (`use_onednn`: float32, and bfloat16 where the CPU has the instructions) and attention as matmuls where that
    was measured faster than SDPA (`matmul_attention`; None: `attends_by_matmuls` decides per call). `cuda_graphs`
    (CUDA, without logits processors) replays each decode step as a CUDA graph (`_StepGraphs`); on an H200 the same
    ids as eager, a quarter of the time for a 60 s clip (0.44 against 1.80 s). `eos_check_interval` k: the host
    looks for finished rows every k steps only (a row that ends stops where it is and waits), so a GPU can run k
    queued steps without waiting for the host in between; k - 1 steps of a finished row are spent idle. Without
    logits processors; `generate()`'s default per device type is `EOS_CHECK_INTERVAL`. `draft_tokens` k: once at
    most `draft_rows` rows decode, each feeds k ids guessed from its own (`_draft`) and keeps what its predictions
    confirm (`_draft_step`); without graphs and processors; `generate()`'s default is `DRAFT_TOKENS`.
    `draft_shift_ids` (first, last): the ids of MT3's time shifts, which the guesses move on in time (`_draft`).
    """

    def __init__(
        self,
        model,
        pool_size: int,
        use_onednn: bool | None = None,
        matmul_attention: bool | None = None,
        cuda_graphs: bool = False,
        eos_check_interval: int = 1,
        group_rows: int | None = None,
        draft_tokens: int = 0,
        draft_rows: int = DRAFT_ROWS,
        draft_shift_ids: tuple[int, int] | list[int] | None = None,
    ):
        # `type(...) is int`: a bool is an int to isinstance, and True as a number of rows is a slip
        if type(pool_size) is not int or pool_size < 1:
            raise ValueError(f"`segment_batch_size` must be a positive number of rows, found {pool_size!r}")
        if type(eos_check_interval) is not int or eos_check_interval < 1:
            raise ValueError(f"`eos_check_interval` must be a positive number of steps, found {eos_check_interval!r}")
        if type(draft_tokens) is not int or draft_tokens < 0:
            raise ValueError(f"`draft_tokens` must be a number of tokens >= 0, found {draft_tokens!r}")
        weight = model.decoder.token_embedder.weight
        vocab = weight.shape[0]
        if draft_shift_ids is not None and not (
            isinstance(draft_shift_ids, (tuple, list)) and len(draft_shift_ids) == 2
            and all(type(i) is int for i in draft_shift_ids) and 0 <= draft_shift_ids[0] <= draft_shift_ids[1] < vocab
        ):
            raise ValueError(f"`draft_shift_ids` must be None or the first and last id of the time shifts, [first, "
                             f"last] with 0 <= first <= last < {vocab} (the vocabulary); found {draft_shift_ids!r}")
        self.model = model
        self.pool_size = pool_size
        cpu = weight.device.type == "cpu"
        if use_onednn is None:  # bfloat16 only where oneDNN has the instructions for it
            use_onednn = cpu and (
                weight.dtype == torch.float32
                or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            )
        self.use_onednn = use_onednn and torch.backends.mkldnn.is_available()
        self.matmul_attention = matmul_attention
        self.cuda_graphs = cuda_graphs
        self.eos_check_interval = eos_check_interval
        # CPU: 2 segments (512 frames) per encoder call keep its activations in cache: 30 segments encoded in
        # 2.4 s, against 3.2 s as one batch (60 s clip, 2 cores); only the admitted ones (encoding ahead put row 3's
        # peak memory 30-80 MB higher, over its 2 GB). A GPU encodes 64 at once, ahead (not measured): the refill
        # admits segments one or two at a time, and an encoder call each would be mostly launch overhead.
        self.encoder_batch, self.encode_ahead = (2, False) if cpu else (64, True)
        # Self-attention in groups of `group_rows` rows, each over its own length (`MT3SlotCache.groups`). CPU: 4
        # (600 s of audio, 293 segments: 8% faster, same ids, in two alternating runs each). GPUs: none (not
        # measured; more launches per step, and graphs would need a capture per combination of lengths).
        self.group_rows = group_rows if group_rows is not None else 4 if cpu else None
        self.draft_tokens, self.draft_rows = draft_tokens, draft_rows
        self.draft_shift_ids = None if draft_shift_ids is None else tuple(draft_shift_ids)

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
        model = self.model
        segments = input_features.shape[0]
        rows = min(self.pool_size, segments)
        device = model.decoder.token_embedder.weight.device
        # a graph replays fixed kernels: the processors' Python stays eager, and needs each row's position per step
        graphs = self.cuda_graphs and not logits_processor
        # a row that ended waits at its last position, which must be in the position table
        max_positions = model.decoder.position_embedding.max_len
        # No row passes the position table without an error (as in GenerationMixin): the id buffers need room for
        # that many ids, not for a limit such as 2**40 that only means "until EOS".
        max_new_tokens = min(max_new_tokens, max_positions + 1)
        interval = 1 if logits_processor or max_new_tokens >= max_positions else self.eos_check_interval
        # Under autocast the linears stay unfused: autocast casts each parameter once (its weight cache), a fused
        # copy would be cast again on every step. Not with graphs: they run without that cache, so every weight is
        # cast on every step anyway. Attention as matmuls has a float32 softmax (CPU under autocast, by default).
        autocast = torch.is_autocast_enabled(device.type)
        matmul = self.matmul_attention
        if matmul is None:
            dtype = model.decoder.token_embedder.weight.dtype
            matmul = self.attends_by_matmuls(device.type, dtype, autocast, rows)
        groups = None if graphs else self.group_rows
        bucket = self.key_bucket(rows, graphs)
        cache = MT3SlotCache(len(model.decoder.layers), rows, device, max_positions, groups, bucket)
        # Inference mode: each op dispatches faster than under no_grad alone (no view or version tracking; the 60 s
        # clip's first 8 segments: 6.64 against 6.98 s, ten alternating runs on 2 CPU cores), same kernels. Under
        # autocast no_grad only (and a caller's own inference mode stays): in inference mode recent torch caches no
        # weight casts, so every step would cast every weight again, and older torch cached inference tensors that
        # a later backward in the same region refuses. (`inference_mode(False)` would turn gradients back on.)
        try:
            with torch.inference_mode() if not autocast else torch.no_grad():  # no_grad: already on, a no-op
                # drafts (a row's guesses checked in one step): not with graphs or processors; oneDNN weights packed
                # for 1 row take twice as long on 2-5 rows (2 CPU cores), so a step with drafts is packed for 2
                drafts = self.draft_tokens if not logits_processor and not graphs else 0
                model.pack(max(rows, 2) if drafts else rows, self.use_onednn and not autocast, matmul,
                           fuse=graphs or not autocast)
                # streams, graphs and their memory pool belong to the current CUDA device: make it the model's
                with torch.cuda.device(device if device.type == "cuda" else -1):  # -1: no CUDA device
                    ids = self._decode(cache, input_features, max_new_tokens, eos_token_ids, pad_token_id,
                                       decoder_start_token_id, logits_processor or None, graphs, interval, drafts)
        finally:
            model.unpack()
            cache.release()
        return ids.to(device, copy=True)  # a copy made outside inference mode: the caller may update it in place

    @staticmethod
    def attends_by_matmuls(device_type: str, dtype: torch.dtype, autocast: bool, rows: int) -> bool:
        """Whether decoding `rows` rows with weights of `dtype` attends through two matmuls rather than SDPA, where
        that was measured faster. CPU: in float32 and under autocast. CUDA (an H200, `make bench` rows 7 and 8 with
        the old attention as `+sdpa`, 2026-11-27): in float32 always, since SDPA's one float32 kernel that takes a
        mask (memory-efficient attention) was 90% of a 256-row step (the 60 s clip, 30 rows, with graphs: 0.44 s
        against 0.54 s; an hour's generate(), 256 rows: 7.1 s, 10.3 s with SDPA in an earlier run); in half
        precision above 64 rows (the hour under autocast float16: 4.7 s against 7.9 s), while fewer rows keep
        SDPA's half-precision kernel, one launch instead of five (the 60 s clip under autocast float16: 0.44 s
        against 0.59 s). Half precision was measured under autocast float16 only; autocast bfloat16 and cast models
        follow it unmeasured (`FEW_ROWS`). Other devices (MPS, XPU): SDPA, not measured."""
        if device_type == "cpu":
            return dtype == torch.float32 or autocast
        if device_type != "cuda":
            return False
        return (dtype == torch.float32 and not autocast) or rows > FEW_ROWS

    @staticmethod
    def key_bucket(rows: int, graphs: bool) -> int:
        """The slot cache's `bucket` for a decode that starts with `rows` rows (kept while rows leave). With CUDA
        graphs each multiple is a capture (~15 ms at 30 rows on an H200): few rows take 128 (30 rows, 333 steps: 3
        captures and 0.57 s, against 11 and 0.69 s with 32); many rows 32, where reading unused keys costs more than
        the captures save (256 rows, 1000 steps: 7.2 s with 128, 6.7 s with 32). Measured at 30 and 256 rows only,
        with random weights and the SDPA attention of the time (matmuls since); `FEW_ROWS` is not."""
        return 128 if graphs and rows <= FEW_ROWS else MT3SlotCache.bucket

    def _decode(self, cache, features, max_new_tokens, eos_token_ids, pad_token_id, start, processors, graphs,
                interval, drafts):
        device, segments = cache.positions.device, features.shape[0]
        eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        out = torch.full((segments, max_new_tokens + 1), pad_token_id, dtype=torch.long)
        # with drafts, rows advance by the ids they confirm, so the host reads their positions; the id buffer has
        # room for a step's guesses past the limit
        rows = _Rows(cache.rows, max_new_tokens + 1 + (drafts + 1 if drafts else 0), start, device)
        encoded = _EncodedSegments(self.model, features, self.encoder_batch, self.encode_ahead, device)
        encoded.admit(cache, list(range(cache.rows)), 0)
        runner = _StepGraphs() if graphs else None
        next_segment, step, generated = cache.rows, 0, 0

        while rows.busy:
            if drafts:
                row_positions = cache.positions.tolist()
                # guesses once few rows are left, and only at positions of the table
                few = cache.rows <= self.draft_rows
                cache.set_ahead(max(min(drafts, cache.max_positions - 1 - max(row_positions)), 0) if few else 0)
            else:
                row_positions = rows.positions(step, max_new_tokens)
            cache.reserve(row_positions)  # raises if a row passed the position table
            positions = None
            if processors is not None:
                positions = {row: row_positions[row] for row, segment in enumerate(rows.segment_of)
                             if segment is not None}
            args = (cache, rows.tokens, rows.active, rows.done, eos, max_new_tokens, processors, positions)
            if runner is None:
                self._step(*args)
            else:
                runner.run(lambda args=args: self._step(*args), cache)  # a graph keeps these tensors
            step += 1
            if step % interval:
                continue
            finished, ends = rows.collect(cache, out)  # the host's one sync per `interval` steps
            if not finished:
                continue
            generated = max(generated, *ends)
            # waiting segments take the first free rows; the other free rows go idle
            admit = finished[: segments - next_segment]
            if admit:
                # a row ended at position `end` wrote keys/values up to it, and drafts up to `drafts` past it
                encoded.admit(cache, admit, next_segment, written=max(ends[: len(admit)]) + 1 + drafts)
                rows.admit(admit, next_segment, step)
                next_segment += len(admit)
            idle = finished[len(admit) :]
            if idle:
                rows.leave(idle, cache)
                keep = _next_power_of_two(rows.busy) if graphs else rows.busy
                if keep < cache.rows:
                    rows.compact(cache, keep)
        return out[:, : 1 + generated]

    def _step(self, cache, tokens, active, done, eos, max_new_tokens, processors, positions) -> None:
        """One decode step of every row, in place: each decoding row's next token goes to its next position in
        `tokens`; a row that ends (EOS or the length limit) sets its `done` flag and stops (`active` off), so that
        later steps leave its tokens and position as they are until the host collects it. Tensors only, no host
        sync, fixed shapes for a given (rows, key length): what a CUDA graph can capture (without `processors`,
        which get each busy row's position, {row: position})."""
        decoder = self.model.decoder
        if cache.ahead:
            return self._draft_step(cache, tokens, active, done, eos, max_new_tokens)
        current = tokens.gather(1, cache.positions[:, None])  # (rows, 1)
        hidden = decoder(current, None, cache=cache).last_hidden_state
        logits = decoder.logits(hidden[:, -1])  # (rows, vocab)
        if processors is not None:
            logits = self._process(processors, logits.float(), tokens, positions)
        next_tokens = torch.where(active, logits.argmax(-1), current[:, 0])  # (rows,); a stopped row: unchanged
        cache.positions += active
        tokens.scatter_(1, cache.positions[:, None], next_tokens[:, None])
        ended = ((next_tokens[:, None] == eos).any(-1) | (cache.positions >= max_new_tokens)) & active
        done.logical_or_(ended)
        active.masked_fill_(ended, False)

    def _draft_step(self, cache, tokens, active, done, eos, max_new_tokens) -> None:
        """`_step` with drafts: each row also feeds its `cache.ahead` guessed next tokens (`_draft`) and keeps those
        that its own predictions confirm, plus the prediction after them: greedy decoding's ids, in fewer steps
        where a segment repeats itself. The keys/values of rejected guesses lie past the row's new position,
        masked until the next step writes over them."""
        ahead = cache.ahead
        self._draft(tokens, cache.positions, ahead, self.draft_shift_ids)
        fed = cache.positions[:, None] + cache.offsets  # (rows, 1 + ahead)
        current = tokens.gather(1, fed)  # each row's last token, then its guesses
        hidden = self.model.decoder(current, None, cache=cache).last_hidden_state
        predicted = self.model.decoder.logits(hidden).argmax(-1)  # (rows, 1 + ahead): the id after each fed one
        confirmed = (predicted[:, :-1] == current[:, 1:]).cumprod(1).sum(1)  # (rows,) leading guesses confirmed
        is_eos = (predicted[..., None] == eos).any(-1)  # (rows, 1 + ahead)
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), ahead + 1)
        # ids kept: the confirmed guesses and the next prediction, up to an EOS and the length limit
        kept = torch.minimum(torch.minimum(confirmed, first_eos) + 1, max_new_tokens - cache.positions) * active
        tokens.scatter_(1, fed + 1, predicted)  # past a row's new position: junk, overwritten before it is read
        ended = ((first_eos < kept) | (cache.positions + kept >= max_new_tokens)) & active
        cache.positions += kept
        done.logical_or_(ended)
        active.masked_fill_(ended, False)

    @staticmethod
    def _draft(tokens: torch.Tensor, positions: torch.Tensor, ahead: int,
               shift_ids: tuple[int, int] | None = None) -> None:
        """Guess each row's next `ahead` ids, written after its position (prompt lookup decoding): the ids that
        followed the latest earlier occurrence of its last two ids (else of its last id), repeated with that period
        where they run out (MT3 often loops through a few events). A row with neither guesses ids that will be
        rejected. With `shift_ids` (first, last), ids in that range are MT3's time shifts, each the absolute time in
        its segment: they are matched and copied as the time they advance, so that a loop played at a steady pace
        (repeated notes, a tremolo) is guessed with its shifts moved on to the times ahead."""
        ids = tokens
        if shift_ids is not None:
            first, last = shift_ids
            is_shift = (tokens >= first) & (tokens <= last)
            time = torch.where(is_shift, tokens - first, 0).cummax(1).values  # (rows, width) the time at each index
            advance = time - torch.nn.functional.pad(time[:, :-1], (1, 0))
            ids = torch.where(is_shift, -1 - advance, tokens)  # a shift as -1 - its advance: never an id
        found = None
        for n in (2, 1):
            # (rows,) where the latest earlier occurrence of the row's last n ids ends, -1: none
            last_seen = MT3GreedyPool._latest_occurrence(ids, positions, n)
            found = last_seen if found is None else torch.where(found < 0, last_seen, found)
        period = (positions - found).clamp(min=1)
        steps = torch.arange(ahead, device=tokens.device)
        guesses = ids.gather(1, found[:, None] + 1 + steps % period[:, None])  # (rows, ahead)
        if shift_ids is not None:  # each guessed shift: the row's time now plus the advances guessed up to it
            shifted = guesses < 0
            times = torch.where(shifted, -1 - guesses, 0).cumsum(1) + time.gather(1, positions[:, None])
            guesses = torch.where(shifted, (first + times).clamp(max=last), guesses)
        tokens.scatter_(1, positions[:, None] + 1 + steps, guesses)

    @staticmethod
    def _latest_occurrence(tokens: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
        """(rows,) the index where the latest occurrence of each row's last `n` ids (those ending at its position)
        ends, before that position; -1 where there is none."""
        device = tokens.device
        key = tokens.gather(1, (positions[:, None] - n + 1 + torch.arange(n, device=device)).clamp(min=0))  # (rows, n)
        ends = torch.arange(n - 1, tokens.shape[1], device=device)  # the last index of each n-id window
        match = (tokens.unfold(1, n, 1) == key[:, None, :]).all(-1)  # (rows, windows)
        match &= ends < positions[:, None]  # before the key itself (and so, after a full key)
        return torch.where(match, ends + 1, 0).amax(1) - 1

    @staticmethod
    def _process(
        processors: LogitsProcessorList, scores: torch.Tensor, tokens: torch.Tensor, positions: dict[int, int]
    ) -> torch.Tensor:
        """Apply the processors to the busy rows ({row: position}): one call per group of rows of the same
        length, since `input_ids` must be rectangular. So a processor sees a group's rows, not the batch: only
        row-independent ones come here (`row_independent`)."""
        groups: dict[int, list[int]] = {}
        for row, position in positions.items():
            groups.setdefault(position, []).append(row)
        for position, rows in groups.items():
            index = torch.tensor(rows, device=scores.device)
            # a processor may return another dtype (GenerationMixin takes the argmax of whatever comes back)
            scores[index] = processors(tokens[index, : position + 1], scores[index]).to(scores.dtype)
        return scores


class _Rows:
    """What `MT3GreedyPool._decode` keeps per row of the slot cache: its ids and flags (tensors, updated in place by
    the decode steps) and, on the host, the segment it decodes and the step at which that segment started."""

    def __init__(self, count: int, width: int, start: int, device: torch.device):
        self.start = start
        self.tokens = torch.full((count, width), start, dtype=torch.long, device=device)  # (rows, width) ids
        self.active = torch.ones(count, dtype=torch.bool, device=device)  # the row decodes (not idle, not ended)
        self.done = torch.zeros(count, dtype=torch.bool, device=device)  # set by a step: the row's segment ended
        self.segment_of: list[int | None] = list(range(count))  # None: idle
        self.admitted_at = [0] * count  # a row's position = step - admitted_at
        self.busy = count

    def positions(self, step: int, limit: int) -> list[int]:
        """Each row's position at `step`: an ended row waits at its last (at most `limit`) until collected; idle: 0."""
        return [0 if segment is None else min(step - at, limit)
                for at, segment in zip(self.admitted_at, self.segment_of)]

    def collect(self, cache: "MT3SlotCache", out: torch.Tensor) -> tuple[list[int], list[int]]:
        """The rows whose segments ended and the position each ended at; their ids go to their segments' rows of
        `out` (segments, 1 + limit), their `done` flags are cleared. One copy to the host."""
        finished = self.done.nonzero()[:, 0].tolist()
        if not finished:
            return [], []
        index = torch.tensor(finished, device=self.done.device)
        self.done[index] = False
        collected = torch.cat((cache.positions[index, None], self.tokens[index]), 1).cpu()  # end, then the ids
        ends = collected[:, 0].tolist()
        for row, end, ids in zip(finished, ends, collected[:, 1:]):
            out[self.segment_of[row], : end + 1] = ids[: end + 1]
        return finished, ends

    def admit(self, rows: list[int], first: int, step: int) -> None:
        """Segments `first`, `first + 1`, ... start in `rows` at `step` (their keys/values are in the cache)."""
        index = torch.tensor(rows, device=self.done.device)
        self.tokens[index, 0], self.active[index] = self.start, True
        for segment, row in enumerate(rows, first):
            self.segment_of[row], self.admitted_at[row] = segment, step

    def leave(self, rows: list[int], cache: "MT3SlotCache") -> None:
        """`rows` go idle: no segment, not active, at position 0."""
        self.busy -= len(rows)
        for row in rows:
            self.segment_of[row] = None
        cache.positions[torch.tensor(rows, device=self.done.device)] = 0

    def compact(self, cache: "MT3SlotCache", keep: int) -> None:
        """The busy rows beyond the first `keep` move into idle rows below it (last first), then every row beyond
        `keep` is dropped, here and in the cache."""
        holes = [row for row in range(keep - 1, -1, -1) if self.segment_of[row] is None]
        movers = [row for row in range(cache.rows - 1, keep - 1, -1) if self.segment_of[row] is not None]
        for hole, mover in zip(holes, movers):
            cache.move(mover, hole)
            self.tokens[hole], self.active[hole] = self.tokens[mover], self.active[mover]
            self.segment_of[hole], self.admitted_at[hole] = self.segment_of[mover], self.admitted_at[mover]
        cache.shrink(keep)
        self.tokens, self.active, self.done = self.tokens[:keep], self.active[:keep], self.done[:keep]
        self.segment_of, self.admitted_at = self.segment_of[:keep], self.admitted_at[:keep]


class _EncodedSegments:
    """Cross-attention keys/values of the admitted segments, encoded `batch` at a time and copied into their rows of
    the slot cache. `ahead`: a call encodes the next `batch` segments when the first of them is admitted, and the
    rest wait for their admission; otherwise it encodes admitted segments only."""

    def __init__(self, model, features: torch.Tensor, batch: int, ahead: bool, device: torch.device):
        self.model, self.features, self.batch, self.ahead, self.device = model, features, batch, ahead, device
        self.first, self.keys_values = 0, []  # segments first .. first + count - 1: per layer (keys, values)
        self.count = 0

    def admit(self, cache: MT3SlotCache, rows: list[int], first: int, written: int = 0) -> None:
        """Segments `first`, `first + 1`, ... start in `rows` (in this order); `written`: `MT3SlotCache.admit`."""
        admitted = 0
        while admitted < len(rows):
            segment = first + admitted
            if not self.first <= segment < self.first + self.count:
                size = self.batch if self.ahead else min(self.batch, len(rows) - admitted)
                chunk = self.features[segment : segment + size].to(self.device)
                states = self.model.encoder(chunk, return_dict=True).last_hidden_state  # (batch, frames, d_model)
                self.keys_values = [layer.encoder_decoder_attention.project_kv(states)
                                    for layer in self.model.decoder.layers]
                self.first, self.count = segment, chunk.shape[0]
            start = segment - self.first
            take = min(len(rows) - admitted, self.count - start)
            index = torch.tensor(rows[admitted : admitted + take], dtype=torch.long, device=self.device)
            cache.admit(index, [(keys[start : start + take], values[start : start + take])
                                for keys, values in self.keys_values], written)
            admitted += take
            if start + take == self.count:  # all admitted: free them now
                self.keys_values, self.count = [], 0


def _next_power_of_two(count: int) -> int:
    return 1 << (count - 1).bit_length()


class _StepGraphs:
    """The decode step as CUDA graphs, one per (rows, key length) of the slot cache: a shape's first step runs
    eagerly and its graph is captured right after, later steps of that shape replay it, a few launches instead of
    ~190 kernels per step. Graphs share one memory pool. They are dropped when the self-attention storage grows,
    since they hold the addresses of the old one, and when the rows shrink, since rows never grow back."""

    def __init__(self):
        self.graphs: dict[int, object] = {}  # per key length, for the rows and capacity in `valid_for`
        self.valid_for = None
        self.pool = self.stream = None

    def run(self, step, cache: MT3SlotCache) -> None:
        if not all(layer.is_initialized for layer in cache.self_attention_cache.layers):
            step()  # the first step allocates the self-attention storage (at the dtype it sees): eager, no capture
            return
        if (cache.rows, cache.capacity) != self.valid_for:
            # the pool is released with the last of its graphs and its handle cannot be used again (PyTorch's
            # allocator asserts): the next capture takes a new one
            self.graphs.clear()
            self.valid_for, self.pool = (cache.rows, cache.capacity), None
        graph = self.graphs.get(cache.length)
        if graph is not None:
            graph.replay()
            return
        # autocast (as the caller set it) without its weight cache: casts cached during a capture would live in the
        # graph's memory (PyTorch's CUDA-graph notes ask for cache_enabled=False)
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                            cache_enabled=False):
            self.graphs[cache.length] = self._capture(step)

    def _capture(self, step) -> "torch.cuda.CUDAGraph":
        """Run `step` once, then record it (a capture runs no kernel). Both on a side stream, as PyTorch's CUDA-graph
        notes ask: the eager run warms up what the capture will use on that stream (cuBLAS workspace, ...)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            step()
            # thread_local: other threads' CUDA work (another request on the same GPU) does not break the capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph


__all__ = [
    "DRAFT_TOKENS",
    "EOS_CHECK_INTERVAL",
    "FAST_GREEDY_SETTINGS",
    "POOL_SETTINGS",
    "SEGMENT_BATCH_SIZE",
    "MT3GreedyPool",
    "MT3SlotCache",
    "MT3SlotLayer",
    "row_independent",
]
