"""Configuration dataclasses: what the model is, and how the engine runs it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (Gemma 3 has one per layer type)."""

    theta: float = 10000.0
    # NOTE: "default", "linear" (Gemma 3 global layers of the larger models) or "llama3".
    scaling_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # Per-dimension divisors of the inverse frequencies, as GGUF files store llama3 scaling.
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer, filled in by a loader."""

    family: str  # "gemma3" | "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Gemma 3: sliding-window layers use their own rotary base.
    local_rope: RopeConfig | None = None
    sliding_window: int | None = None
    # layer_types[i] is "full" or "sliding"; empty means every layer is full.
    layer_types: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and caches. Every limit a user may want to turn is here;
    the command line is derived from these fields and their help texts."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    num_kv_tokens: int | None = field(default=None, metadata={
        "help": "KV-cache capacity of the full-attention layers, in tokens (default: from --kv-cache-memory-gb)"})
    kv_cache_memory_gb: float = field(default=2.0, metadata={"help": "memory for the KV cache, in GiB"})
    max_num_batched_tokens: int = field(default=512, metadata={
        "help": "token budget of one engine step; longer prompts are prefilled in chunks of this size"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences running at once"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context limit in tokens (default: the model's)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV cache of prompts that share a prefix"})
    dtype: str = field(default="float32", metadata={
        "help": "activation, KV-cache and weight dtype: float32 (exact) or bfloat16"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache dtype: auto (float16 with float32 weights and a fast --quantization: half the bytes "
                "attention reads, as llama.cpp's default; the model's dtype otherwise), float32, bfloat16 or "
                "float16"})
    quantization: str = field(default="auto", metadata={
        "help": "weights of the decoder's linear layers: auto (with float32: int8 copies, times a single "
                "row's float32 activations, or times larger batches' activations rounded to int8 per group of "
                "32 inputs), none (the dtype's weights only: exact in float32), int8 (weights only) or w8a8 "
                "(weights and activations, one activation scale per token)"})
    lm_head_quantization: str = field(default="w8a8", metadata={
        "help": "quantization of the LM head: w8a8 (int8 screening, 4-bit for a single row, then each row's "
                "best 32 (64) logits recomputed exactly: greedy output identical to none on the accuracy "
                "prompts, ~3x faster), none (exact) or int8"})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: all cores)"})
    scheduling_policy: str = field(default="qoe", metadata={
        "help": "who goes first when a step cannot serve everyone: qoe (the stream closest to "
                "running dry for its reader), fcfs (arrival order) or priority (the request's priority)"})
    fairness: str = field(default="none", metadata={
        "help": "none, or tenant: tenants (API key or `user`) share throughput evenly"})
    max_stall_ms: float | None = field(default=200.0, metadata={
        "help": "cap each step's prompt tokens so running streams' inter-token gap stays under this "
                "(0: no cap, chunks of max_num_batched_tokens)"})
    qoe_ttft_s: float = field(default=1.0, metadata={
        "help": "default time-to-first-token target of a reader (requests may set their own)"})
    qoe_tokens_per_s: float = field(default=5.0, metadata={
        "help": "default reading speed in tokens/s (requests may set their own)"})

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_kv_tokens is not None and self.num_kv_tokens < self.block_size:
            raise ValueError(f"num_kv_tokens must hold at least one block of {self.block_size} tokens")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, got {self.kv_cache_dtype!r}")
        if self.scheduling_policy not in ("qoe", "fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be qoe, fcfs or priority, got {self.scheduling_policy!r}")
        if self.fairness not in ("none", "tenant"):
            raise ValueError(f"fairness must be none or tenant, got {self.fairness!r}")
        if self.max_stall_ms is not None and self.max_stall_ms < 0:
            raise ValueError(f"max_stall_ms must be >= 0, got {self.max_stall_ms}")
        if not self.qoe_ttft_s >= 0 or not self.qoe_tokens_per_s > 0:
            raise ValueError("qoe_ttft_s must be >= 0 and qoe_tokens_per_s > 0")
        if self.quantization not in ("auto", "none", "int8", "w8a8"):
            raise ValueError(f"quantization must be auto, none, int8 or w8a8, got {self.quantization!r}")
        if self.lm_head_quantization not in ("none", "int8", "w8a8"):
            raise ValueError(f"lm_head_quantization must be none, int8 or w8a8, got {self.lm_head_quantization!r}")
