"""Torch reference implementations of every kernel.

They define what each kernel computes, run on the CPU, and are what the Triton kernels are
tested against. Shapes:

- KV cache of one layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = key, 1 = value).
- A step's tokens are flattened: `[num_tokens, ...]`, request i owning rows
  `query_start_loc[i]:query_start_loc[i + 1]`, which are the last tokens of its sequence of
  `seq_lens[i]` tokens (the earlier ones are already in the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448: e4m3fn has no infinity, past this it is NaN


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype: for an FP8 cache x / scale, saturated to the finite range and
    rounded to nearest even; otherwise x itself, cast."""
    if dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store the step's keys and values ([num_tokens, num_kv_heads, head_dim]) at their slots
    (`block_id * block_size + offset`); a slot of -1 (padding) is skipped. An FP8 cache stores
    key / k_scale and value / v_scale (see `quantize_kv`)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    key, value = quantize_kv(key, k_scale, kv_cache.dtype), quantize_kv(value, v_scale, kv_cache.dtype)
    if kv_cache.dtype == FP8_KV_DTYPE:  # index_copy_ has no float8 kernel on the CPU: copy the bytes
        flat, key, value = flat.view(torch.uint8), key.view(torch.uint8), value.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    decode_order: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole cached sequence.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. Grouped-query attention
    when num_heads is a multiple of num_kv_heads. The new tokens' keys and values must already
    be in the cache (write_kv_cache runs first). decode_order, a permutation of the requests
    of a batch with one query each, only orders the Triton kernel's work: it changes no result.
    An FP8 cache holds key / k_scale and value / v_scale: they are read back times their scale,
    in float32.
    """
    out = torch.empty_like(query)
    num_queries = query_start_loc[1:] - query_start_loc[:-1]
    decodes = torch.nonzero(num_queries == 1).flatten()
    if len(decodes):
        rows = query_start_loc[decodes].long()
        out[rows] = _decode_attention(query[rows], kv_cache, seq_lens[decodes], block_tables[decodes], scale,
                                      k_scale, v_scale)
    # The rest (prefill chunks) one request at a time: the reference favours clarity; the
    # Triton kernel does the whole batch in one launch.
    starts = query_start_loc.tolist()
    for i in torch.nonzero(num_queries > 1).flatten().tolist():
        seq_len = int(seq_lens[i])
        q_start, q_end = starts[i], starts[i + 1]
        k, v = _gather_kv(kv_cache, block_tables[i:i + 1], seq_len, k_scale, v_scale)
        q = query[q_start:q_end].transpose(0, 1)  # [heads, queries, dim]
        # Query j sits at position seq_len - num_queries + j and sees keys up to that position.
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=query.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=query.device).unsqueeze(0) <= q_pos
        o = _sdpa(q.unsqueeze(0), k, v, mask, scale)
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def _gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int, k_scale: float,
               v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each row's first max_len positions: [rows, kv_heads, max_len, dim]
    (an FP8 cache's dequantized to float32)."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    blocks = block_tables[:, :-(-max_len // block_size)].long()
    kv = kv_cache[:, blocks].flatten(2, 3)[:, :, :max_len]  # [2, rows, max_len, heads, dim]
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    if kv_cache.dtype == FP8_KV_DTYPE:
        return k.float() * k_scale, v.float() * v_scale
    return k, v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """In float32 when the keys are (a dequantized FP8 cache), else in the query's dtype."""
    dtype = torch.promote_types(q.dtype, k.dtype)
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, k_scale: float, v_scale: float) -> torch.Tensor:
    """Single-query requests batched together, their keys padded to the longest."""
    k, v = _gather_kv(kv_cache, block_tables, int(seq_lens.max()), k_scale, v_scale)
    mask = torch.arange(k.shape[2], device=query.device).unsqueeze(0) < seq_lens.unsqueeze(1)  # [rows, max_len]
    # Padding slots may hold anything, NaN included, and a masked-out NaN still poisons
    # the weighted sum of values (0 * NaN): zero them.
    valid = mask[:, None, :, None]
    k, v = k.masked_fill(~valid, 0), v.masked_fill(~valid, 0)
    o = _sdpa(query.unsqueeze(2), k, v, mask[:, None, None, :], scale)  # [rows, heads, 1, dim]
    return o.squeeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). With a residual, `x + residual` is normalized and is
    the new residual; without one, x itself is the new residual. Computed in float32."""
    if residual is not None:
        x = x + residual
    residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), residual


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hk, D] in place, neox style (halves rotated).
    cos_sin_cache: [max_position, D] holding cos in the first half and sin in the second."""
    cos_sin = cos_sin_cache[positions]
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, :half].unsqueeze(1)
    sin = cos_sin[:, half:].unsqueeze(1)
    for x in (query, key):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated.to(x.dtype))


def norm_rope_write_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One layer's attention inputs for the step: with norm weights (Qwen3: both or neither),
    rms_norm over each head of query and key; then rotary_embedding of both; then
    write_kv_cache of the keys and values (with k_scale and v_scale for an FP8 cache). Returns
    the rotated query as a new tensor and leaves `query` and `key` as they were."""
    if q_norm_weight is not None:
        query, _ = rms_norm(query, q_norm_weight, eps)
        key, _ = rms_norm(key, k_norm_weight, eps)
    else:
        query, key = query.clone(), key.clone()
    rotary_embedding(positions, query, key, cos_sin_cache)
    write_kv_cache(key, value, kv_cache, slot_mapping, k_scale, v_scale)
    return query


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding gate then up; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, vocab] (any float dtype), temperature [B], seeds [B] int64 -> token ids [B].

    A row whose temperature is 0 takes `argmax(logits)` (the first on ties); any
    other row samples softmax(logits / T) as `argmax(logits / T + Gumbel noise)`, the noise
    drawn from a generator seeded with the row's seed alone, so a row's token does not depend
    on its batch. The Triton kernel draws its noise from Philox instead (see
    kernels.triton_sampling), which torch does not reproduce: the two agree exactly on greedy
    rows and in distribution on the others."""
    x = logits.float()
    tokens = x.argmax(dim=-1)
    for row in torch.nonzero(temperature != 0).flatten().tolist():
        generator = torch.Generator(device=logits.device).manual_seed(int(seeds[row]))
        # -log(E) with E ~ Exp(1) is Gumbel noise.
        noise = -torch.empty_like(x[row]).exponential_(generator=generator).log()
        tokens[row] = (x[row] / temperature[row] + noise).argmax()
    return tokens


def rejection_sample(draft_token_ids: torch.Tensor, cu_num_draft: torch.Tensor, target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None, bonus_token_ids: torch.Tensor, is_greedy: torch.Tensor,
                     seeds: torch.Tensor, max_num_draft: int) -> torch.Tensor:
    """Speculative decoding's rejection sampler (Leviathan et al., 2023); see
    kernels.ops.rejection_sample for the shapes. Returns [B, max_num_draft + 1] int64.

    Request b's drafts d_j are draft_token_ids[cu[b]:cu[b + 1]], with target rows p_j and
    draft rows q_j (a point mass on d_j when draft_probs is None). A greedy request accepts
    d_j while it is argmax(p_j) and otherwise emits that argmax. A sampled request accepts d_j
    while u_j * q_j(d_j) <= p_j(d_j), u_j ~ U(0, 1), and at its first rejection emits a sample
    of max(p_j - q_j, 0), renormalized (of p_j should that be all zero, which rounding alone
    can cause): each emitted token is then distributed as p_j. The row holds the accepted
    drafts, then the recovered token, or the bonus token when every draft was accepted, then
    -1. A request's randomness comes from a generator seeded with its seed alone, so its row
    does not depend on its batch. The Triton kernel draws from Philox instead (see
    kernels.triton_rejection): the two agree exactly on greedy requests and in distribution
    on the others."""
    out = torch.full((len(bonus_token_ids), max_num_draft + 1), -1, dtype=torch.int64, device=target_probs.device)
    cu = cu_num_draft.tolist()
    for req, greedy in enumerate(is_greedy.tolist()):
        start, end = cu[req], cu[req + 1]
        if end - start > max_num_draft:
            raise ValueError(f"request {req} has {end - start} drafts, more than max_num_draft={max_num_draft}")
        drafts, p = draft_token_ids[start:end], target_probs[start:end]
        p_draft = p.gather(1, drafts[:, None])[:, 0]
        if greedy:
            target_tokens = p.argmax(dim=-1)
            accepted = drafts == target_tokens
        else:
            generator = torch.Generator(device=p.device).manual_seed(int(seeds[req]))
            u = torch.rand(end - start, generator=generator, device=p.device)
            q_draft = 1.0 if draft_probs is None else draft_probs[start:end].gather(1, drafts[:, None])[:, 0]
            accepted = u * q_draft <= p_draft
        num_accepted = int(accepted.int().cumprod(0).sum())
        out[req, :num_accepted] = drafts[:num_accepted]
        if num_accepted == end - start:
            out[req, num_accepted] = bonus_token_ids[req]
        elif greedy:
            out[req, num_accepted] = target_tokens[num_accepted]
        else:
            row = start + num_accepted
            if draft_probs is None:
                residual = p[num_accepted].clone()
                residual[drafts[num_accepted]] = 0
            else:
                residual = (p[num_accepted] - draft_probs[row]).clamp_(min=0)
            if not bool(residual.any()):
                residual = p[num_accepted]
            # Exponential race: argmax(w / E) with E ~ Exp(1) samples from w / sum(w).
            noise = torch.empty_like(residual).exponential_(generator=generator)
            out[req, num_accepted] = (residual / noise).argmax()
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Structured outputs: in place, set to -inf the logits of `rows` whose tokens their mask
    forbids. bitmask [M, ceil(V / 32)] int32: bit i of word w allows token 32 w + i for
    logits row rows[m] (M int64 row indices, distinct); tokens past the mask's width are
    forbidden too."""
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    if allowed.shape[1] < vocab_size:
        allowed = torch.cat((allowed, allowed.new_zeros(len(rows), vocab_size - allowed.shape[1])), dim=1)
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab_size], float("-inf"))


def quantize_fp8_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as float8 e4m3 and its float32 scales [M, 1], x ~ xq * scale: one scale per row
    (amax / 448) or, with a static `input_scale` (one value), that one for every row."""
    x32 = x.float()
    if input_scale is None:
        scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE), scale


# At most this many rows (a decode batch), FP8 linear layers keep the activations unquantized
# and widen the weight instead: the step is bound by reading weights, so quantizing activations
# would cost a launch per layer and accuracy for nothing (kernels/triton_fp8.py).
WEIGHT_ONLY_MAX_ROWS = 16


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T for W = weight [N, K] float8 e4m3 times weight_scale [N] (per output
    channel), accumulated in float32, in x's dtype. Over WEIGHT_ONLY_MAX_ROWS rows x is
    quantized to e4m3 per token (or with the static input_scale) and the product scaled per
    row and column; up to it x is used as it is."""
    if x.numel() <= WEIGHT_ONLY_MAX_ROWS * x.shape[-1]:
        return (x.float() @ (weight.float() * weight_scale.float()[:, None]).T).to(x.dtype)
    xq, x_scale = quantize_fp8_per_token(x, input_scale)
    y = (xq.float() @ weight.float().T) * x_scale * weight_scale.float()[None, :]
    return y.to(x.dtype)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [K / 8, N] int32, nibble j (bits 4j..4j+3) of row r holding weight row 8r + j
    (GPTQ's packing along the input dim) -> [K, N] int32 in [0, 16)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K / 8, 8, N]
    return nibbles.reshape(-1, qweight.shape[1])


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x [M, K] @ W for the 4-bit W [K, N] = (q - zeros) * scales: q packed by
    `unpack_int4_rows`' layout, scales and zeros [K / group_size, N] (zeros as floats in
    [0, 16)), rows k of group k // group_size. Dequantizes the whole weight per call: the
    reference favours clarity; the Triton kernel dequantizes tile by tile in registers."""
    q = unpack_int4_rows(qweight).float()
    weight = (q - zeros.float().repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)
    return (x.float() @ weight).to(x.dtype)
