"""Per-GPU memory of a training step, estimated from the architecture and the config (``keel plan``).

Arithmetic (no model, no DeepSpeed), every term in bytes; the formulas are documented in
docs/training.md ("Sizing a run: keel plan"):

- model states: the partitioned parameters, gradients and optimizer states; with the largest layer's
  gathered weights and gradients (``gathered_layer``) they are DeepSpeed's own ZeRO estimate
  (``estimate_zero3_model_states_mem_needs``), generalised to frozen parameters (LoRA) and to the offload
  settings;
- ZeRO buffers: the layer ZeRO-3 gathers to compute it and the gradient reduce bucket DeepSpeed allocates
  up front;
- activations: the tensors a Llama-style decoder layer saves for backward, with or without gradient
  checkpointing, attention as packed varlen (no S×S matrix) except ``sdpa_block``;
- logits: the chunked LM head + cross-entropy over supervised positions (``LOSS_CHUNK_LOGITS``);
- a margin: the CUDA context and NCCL per process plus a share for allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.core.loss import CHUNK_LOGITS

GIB = 1 << 30
# CUDA context, cuBLAS workspaces and NCCL communicator buffers of one worker process.
CUDA_CONTEXT_BYTES = int(1.5 * GIB)
# Caching-allocator fragmentation: a share on top of the estimated tensors.
FRAGMENTATION = 0.10
# Logits the chunked loss holds at once.
LOSS_CHUNK_LOGITS = CHUNK_LOGITS
# DeepSpeed's defaults for the buckets Keel leaves unset (zero_optimization.reduce_bucket_size, ...).
REDUCE_BUCKET = 500_000_000
ALLGATHER_BUCKET = 500_000_000
# Saved-for-backward tensors of the attention kernel that are fp32 whatever the model dtype (logsumexp).
LSE_BYTES = 4


@dataclass(frozen=True)
class Layout:
    """One layer's widths (elements per token) as the activation formula needs them."""

    hidden: int
    q: int  # num_heads · head_dim
    kv: int  # num_kv_heads · head_dim
    intermediate: int
    heads: int
    norms: int  # RMSNorms per layer (2; Gemma 2: 4)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)


def model_states(total: int, trainable: int, largest: int, world: int, stage: int, dtype_bytes: int,
                 offload_optimizer: bool = False, offload_param: bool = False) -> int:
    """Parameters, gradients and optimizer states on one GPU (DeepSpeed's ZeRO estimates, generalised).

    Every parameter holds its weight in the model dtype (b). Per trainable parameter the optimizer side
    holds fp32 gradients (4), fp32 master weights (4; none when the model is fp32) and Adam's two moments
    (8); ZeRO-1/2 add the 16-bit gradient (b). ZeRO-3 partitions all of it over the world (bf16: 18 B per
    parameter, the 2 + 2 + 12 of mixed-precision Adam plus DeepSpeed's fp32 gradient of the optimizer step
    instead of a 16-bit one); the layer it gathers to compute is ``gathered_layer``. ZeRO-2 partitions the
    gradients and optimizer states, ZeRO-1 the optimizer states. With bf16 and every parameter trainable,
    this plus ``gathered_layer`` is DeepSpeed's ``4·L + 18·P/world`` (ZeRO-3; ``4·L + 2·P/world`` and
    ``4·L`` with the optimizer, and also the parameters, offloaded) and this alone ``2·P + 18·P/world``
    (ZeRO-2; ``2·P`` offloaded).
    """
    optimizer = 0 if offload_optimizer else (4 + (4 if dtype_bytes < 4 else 0) + 8) * trainable
    weights = dtype_bytes * total
    grads = dtype_bytes * trainable
    if stage == 3:
        weights = 0 if offload_param else weights
        return (weights + optimizer) // world
    if offload_optimizer:  # gradients and optimizer states live on the host
        return weights + (grads if stage < 2 else 0)
    if stage == 2:
        return weights + (grads + optimizer) // world
    return weights + grads + (optimizer // world if stage == 1 else optimizer)


def gathered_layer(stage: int, dtype_bytes: int, largest: int) -> int:
    """ZeRO-3's working copy of the layer it computes: the largest module's full weights and gradients (2·b·L)."""
    return 2 * dtype_bytes * largest if stage == 3 else 0


def zero_buffers(stage: int, dtype_bytes: int, overlap_comm: bool) -> int:
    """The communication buckets DeepSpeed allocates: ZeRO-3's contiguous reduce bucket; ZeRO-1/2's
    reduce and all-gather buckets, 4.5 times over with ``overlap_comm`` (DeepSpeed's documentation)."""
    if stage == 3:
        return REDUCE_BUCKET * dtype_bytes
    if stage == 0:
        return 0
    return int((REDUCE_BUCKET + ALLGATHER_BUCKET) * dtype_bytes * (4.5 if overlap_comm else 1))


def layer_bytes_per_token(layout: Layout, dtype_bytes: int, dense_kv: bool) -> int:
    """Bytes one decoder layer saves for backward per token (Llama-style, RMSNorm computed in fp32).

    - each RMSNorm: its fp32 input (4·h) and its normalised output in the model dtype (b·h); the two
      pre-norms' outputs are the projections' saved inputs (2·b·h);
    - q/k RMSNorm (Qwen3): (4 + b)·(q + kv);
    - attention kernel: q, k, v (b·(q + 2·kv); repeated to every head, b·3·q, where ``dense_kv``),
      its output (b·q, also o_proj's input) and its fp32 logsumexp (4 per head);
    - MLP: the gate and up projections, the activation and the product (4·b·i).
    RoPE saves nothing per layer (cos/sin are shared and need no gradient).
    """
    b, lo = dtype_bytes, layout
    norms = lo.norms * (4 + b) * lo.hidden + 2 * b * lo.hidden
    qk = (4 + b) * (lo.q + lo.kv) if lo.qk_norm else 0
    qkv = b * 3 * lo.q if dense_kv else b * (lo.q + 2 * lo.kv)
    attention = qkv + b * lo.q + LSE_BYTES * lo.heads
    return norms + qk + attention + 4 * b * lo.intermediate


def dense_mask_bytes(rows: int, max_len: int, dtype_bytes: int) -> int:
    """``sdpa_block``'s per-layer S×S block-causal mask of each row: boolean, plus SDPA's additive bias."""
    return rows * max_len * max_len * (1 + dtype_bytes)


def activations(layout: Layout, layers: int, rows: int, max_len: int, dtype_bytes: int, checkpointing: bool,
                dense: bool) -> int:
    """Activation memory of one micro-batch (``rows`` packed rows of ``max_len`` tokens) at its peak, the
    start of the backward pass.

    Without checkpointing every layer's saved tensors are alive; with it only each layer's input
    (b·h per token) is, plus one layer recomputed. Either way one layer's worth of activation gradients
    is in flight, and the final norm's saved tensors are added. ``dense`` (``sdpa_block``) adds the S×S
    mask per layer and repeats k/v to every head.
    """
    tokens = rows * max_len
    layer = layer_bytes_per_token(layout, dtype_bytes, dense) * tokens
    if dense:
        layer += dense_mask_bytes(rows, max_len, dtype_bytes)
    saved = layers * dtype_bytes * layout.hidden * tokens + layer if checkpointing else layers * layer
    final_norm = (4 + dtype_bytes) * layout.hidden * tokens
    return saved + layer + final_norm


def logits(hidden: int, vocab: int, tokens: int, dtype_bytes: int, softcap: bool) -> int:
    """The LM head and cross-entropy over at most ``tokens`` supervised positions, chunked: the gathered
    hidden states and their gradient (2·b·h per position) plus one chunk of logits in the model dtype and
    in fp32, the log-softmax and their gradients ((2·b + 16) per logit; Gemma 2's softcap: b more)."""
    chunk = min(tokens, max(1, LOSS_CHUNK_LOGITS // vocab)) * vocab
    per_logit = 2 * dtype_bytes + 16 + (dtype_bytes if softcap else 0)
    return 2 * dtype_bytes * hidden * tokens + per_logit * chunk


def margin(allocated: int) -> int:
    """CUDA context and NCCL of the process plus ``FRAGMENTATION`` of the allocated tensors."""
    return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)
