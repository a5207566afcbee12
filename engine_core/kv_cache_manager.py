"""KVCacheManager: which KV blocks each request owns, and prefix caching over the block pool.

The engine core only handles block ids; the workers own the tensors. A full block's hash
chains its parent's hash with its token ids, so equal hashes mean equal whole prefixes.
"""

from __future__ import annotations

from engine_core.block_pool import BlockHash, BlockPool, KVCacheBlock
from engine_core.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already hashed
        # Counted in tokens, and drained by the scheduler into its stats each step.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def usage(self) -> float:
        return self.block_pool.usage()

    def _hash_full_blocks(self, request: Request) -> list[BlockHash]:
        """Extend the request's chained block hashes over every full block of its tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request's full blocks, and its length in tokens."""
        # Prompt logprobs need logits at every prompt position, so such a request skips the cache.
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._hash_full_blocks(request)
        # The last token is always recomputed: the step needs its logits to sample.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Give the request blocks for `num_new_tokens` beyond its computed tokens (and beyond
        `new_computed_blocks`, prefix hits it is about to take), plus `num_lookahead_tokens`
        slots after them (a draft model's KV of the tokens it proposes). Returns the blocks
        appended to the request's table (hits first), or None, changing nothing, if the pool
        cannot supply them."""
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_hits = len(new_computed_blocks) if new_computed_blocks else 0
        num_computed = request.num_computed_tokens + num_hits * self.block_size
        num_slots = num_computed + num_new_tokens + num_lookahead_tokens
        num_needed = -(-num_slots // self.block_size) - len(blocks) - num_hits
        added: list[KVCacheBlock] = []
        if num_hits:
            # Idle cached hits sit in the free list: taking them shrinks what is left to allocate.
            num_idle_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
            if num_needed > self.block_pool.num_free_blocks - num_idle_hits:
                return None
            self.block_pool.touch(new_computed_blocks)
            added.extend(new_computed_blocks)
        if num_needed > 0:
            if num_needed > self.block_pool.num_free_blocks:
                return None
            added.extend(self.block_pool.get_new_blocks(num_needed))
        if added:
            blocks.extend(added)
        if self.enable_prefix_caching:
            # Blocks whose tokens are all known and computed by the end of this step become
            # hits for later requests (and for ones in this same step: every layer writes the
            # step's KV before any request attends).
            num_full = min(num_computed + num_new_tokens, len(request.all_token_ids)) // self.block_size
            if num_full > self.num_cached_blocks.get(request.request_id, 0):
                self._cache_blocks(request, blocks, num_full)
        return added

    def _cache_blocks(self, request: Request, blocks: list[KVCacheBlock], num_full: int) -> None:
        start = self.num_cached_blocks.get(request.request_id, 0)
        hashes = self._hash_full_blocks(request)
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        self.block_pool.free_blocks(blocks[::-1])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()
