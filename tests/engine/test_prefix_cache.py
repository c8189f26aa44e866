"""Prefix caching: chained page keys, the evictable LRU in the BlockManager, and the engine
reusing cached pages with the same greedy tokens as the dense reference and as no cache."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from nanoflow_jax import LLM, SamplingParams
from nanoflow_jax.engine.block_manager import BlockManager, OutOfPagesError
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.prefix_cache import ROOT_KEY, extend_keys, page_key
from nanoflow_jax.engine.sampling_params import SamplingParams as Params
from nanoflow_jax.engine.scheduler import Scheduler
from nanoflow_jax.engine.sequence import Sequence
from nanoflow_jax.generate import engine_args, build_parser
from tests.engine.conftest import ENGINE_KW, make_llm, random_prompts, reference_greedy

BS = ENGINE_KW["block_size"]


def keys_for(tokens: list[int], bs: int = 4) -> list[bytes]:
    return extend_keys([], len(tokens) // bs, bs, lambda a, b: tokens[a:b])


# ---- keys and the BlockManager ---------------------------------------------------------


def test_page_keys_chain_every_token_before_them():
    a = list(range(12))
    b = [99] + a[1:]                  # differs only in the first token
    ka, kb = keys_for(a), keys_for(b)
    assert len(ka) == 3 and len(set(ka)) == 3
    assert all(x != y for x, y in zip(ka, kb)), "a page's key must depend on every earlier token"
    assert keys_for(a[:8]) == ka[:2], "a prefix has the prefix of the keys"
    assert ka[0] == page_key(ROOT_KEY, a[:4]) and ka[1] == page_key(ka[0], a[4:8])
    # Same tokens at another depth: another key (position is part of the chain).
    assert page_key(ka[0], a[:4]) != ka[0]
    # Incremental extension gives the same keys as one pass.
    grown = keys_for(a[:4])
    assert extend_keys(grown, 3, 4, lambda s, e: a[s:e]) == ka
    assert len(grown) == 1, "a list another request may share is never changed"


def cached_manager(num_pages: int = 9) -> BlockManager:
    return BlockManager(num_pages=num_pages, block_size=4, enable_prefix_caching=True)


def test_released_cached_pages_stay_mappable_and_count_as_free():
    bm = cached_manager()
    keys = keys_for(list(range(16)))
    pages = bm.allocate(4)
    for p, k in zip(pages[:3], keys[:3]):       # the fourth page is not full: never cached
        bm.cache_page(p, k)
    bm.release(pages)
    assert bm.all_free() and bm.num_free == 8
    assert bm.prefix_cache.num_cached == 3 and bm.prefix_cache.num_evictable == 3
    # The longest cached prefix: three pages (the fourth key was never cached).
    got = bm.match_prefix(keys)
    assert got == pages[:3] and all(bm.refcount(p) == 1 for p in got)
    assert bm.num_free == 5 and not bm.all_free()
    # A second holder shares them; the keys of another prompt find nothing.
    assert bm.match_prefix(keys[:2]) == pages[:2] and bm.refcount(pages[0]) == 2
    assert bm.match_prefix(keys_for([7] * 16)) == []
    bm.release(pages[:2])
    bm.release(got)
    assert bm.all_free()


def test_eviction_is_lru_deepest_page_first_and_only_when_the_free_list_is_empty():
    bm = cached_manager(num_pages=7)            # 6 usable pages
    ka, kb = keys_for(list(range(8))), keys_for(list(range(100, 108)))
    a, b = bm.allocate(2), bm.allocate(2)
    for pages, keys in ((a, ka), (b, kb)):
        for p, k in zip(pages, keys):
            bm.cache_page(p, k)
    bm.release(a)                               # a released first: a is least recent
    bm.release(b)
    fresh = bm.allocate(2)                      # the two never-used pages first: nothing evicted
    assert set(fresh).isdisjoint(a + b) and bm.prefix_cache.stats.evictions == 0
    first = bm.allocate(1)                      # now a's deepest page goes
    assert first == [a[1]] and bm.prefix_cache.stats.evictions == 1
    assert bm.match_prefix(ka) == [a[0]], "a's first page is still cached"
    bm.release([a[0]])                          # ... and now the most recently released
    assert bm.allocate(2) == [b[1], b[0]]
    assert bm.match_prefix(kb) == [] and bm.match_prefix(ka) == [a[0]]
    with pytest.raises(OutOfPagesError):
        bm.allocate(1)


def test_duplicate_keys_reset_and_misuse():
    bm = cached_manager()
    k = keys_for([1, 2, 3, 4])
    p, q = bm.allocate(2)
    bm.cache_page(p, k[0])
    bm.cache_page(q, k[0])                      # the same tokens computed twice: q stays private
    bm.cache_page(p, keys_for([5, 6, 7, 8])[0])  # p keeps its first key
    assert bm.prefix_cache.key_of(q) is None and bm.prefix_cache.key_of(p) == k[0]
    bm.release([p, q])
    assert bm.prefix_cache.num_evictable == 1 and bm.all_free()
    assert bm.reset_prefix_cache() == 1
    assert bm.prefix_cache.num_cached == 0 and bm.all_free() and bm.match_prefix(k) == []
    with pytest.raises(ValueError, match="not allocated"):
        bm.cache_page(p, k[0])
    off = BlockManager(num_pages=4, block_size=4)
    assert off.prefix_cache is None and off.match_prefix(k) == [] and off.reset_prefix_cache() == 0


def test_random_shared_workload_reads_only_pages_holding_its_tokens():
    """The scheduler over a fake device memory (pages written when a batch is dispatched),
    async one iteration late, with aborts and batches never dispatched: every row's context pages hold exactly its
    tokens, refcounts match the holders, and the pool ends full (cached pages counted)."""
    from tests.engine.test_scheduler import deliver

    rng = random.Random(3)
    bs = 4
    cfg = EngineConfig(max_model_len=256, max_num_seqs=6, max_num_batched_tokens=24, block_size=bs,
                       num_kv_pages=24)
    s = Scheduler(cfg, BlockManager(24, bs, enable_prefix_caching=True))
    systems = [[rng.randrange(256) for _ in range(rng.randint(4, 30))] for _ in range(3)]
    pending = [Sequence(request_id=str(i), arrival=i, prompt=None,
                        prompt_token_ids=rng.choice(systems) + [rng.randrange(256) for _ in range(rng.randint(1, 20))],
                        params=Params(max_tokens=30), seed=0, max_tokens=rng.randint(1, 30))
               for i in range(120)]
    memory: dict[tuple[int, int], int] = {}   # (page, slot) -> token

    def token(q: Sequence, pos: int) -> int:
        return q.prompt_token_ids[pos] if pos < q.prompt_len else 1   # deliver() answers 1

    ended, in_flight = [], None
    for _ in range(20000):
        while pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        batch = s.form()
        if batch is not None and rng.random() < 0.05:   # never dispatched: one request fails
            victim = rng.choice(batch.rows).seq
            s.finish(victim, "error")
            ended.append(victim.request_id)
            batch = None
        if batch is not None:
            for row in batch.rows:
                q, table = row.seq, row.seq.block_table
                assert all(memory.get((table[p // bs], p % bs)) == token(q, p) for p in range(row.start)), \
                    f"request {q.request_id} reads a page that does not hold its tokens"
            for row in batch.rows:   # the device writes the batch's K/V before its attention reads
                for p in range(row.start, row.start + row.length):
                    memory[(row.seq.block_table[p // bs], p % bs)] = token(row.seq, p)
            s.commit(batch)
            holders = collections.Counter(p for q in s.running for p in q.block_table)
            assert all(s.blocks.refcount(p) == n for p, n in holders.items())
            assert len(holders) + s.blocks.num_free == s.blocks.num_usable, "pages leaked"
        if in_flight is not None:
            ended += [q.request_id for q in deliver(s, in_flight)]
        if s.running and rng.random() < 0.03:
            victim = rng.choice(s.running)
            s.finish(victim, "abort")
            ended.append(victim.request_id)
        in_flight = batch
        if not pending and not s.has_unfinished() and in_flight is None:
            break
    assert sorted(ended, key=int) == [str(i) for i in range(120)]
    stats = s.blocks.prefix_cache.stats
    assert stats.hits > stats.queries / 4 and stats.evictions > 0 and s.num_preemptions > 0
    assert s.blocks.all_free()


# ---- the engine ------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def shared_prompts(n: int, system_len: int = 30, seed: int = 5) -> list[list[int]]:
    system = random_prompts(1, [system_len], seed=seed)[0]
    tails = random_prompts(n, list(np.random.default_rng(seed).integers(1, 12, size=n)), seed=seed + 1)
    return [system + t for t in tails]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_shared_system_prompt_reuses_pages_with_identical_outputs(async_scheduling):
    prompts = shared_prompts(10)
    ref = reference_greedy(prompts, GREEDY.max_tokens)
    on, off = make_llm(async_scheduling=async_scheduling), make_llm(async_scheduling=async_scheduling,
                                                                    enable_prefix_caching=False)
    assert run(on, prompts) == ref
    assert run(off, prompts) == ref
    stats = on.engine.prefix_cache_stats
    assert off.engine.prefix_cache_stats is None
    assert stats.requests == 10 and stats.queries == sum(map(len, prompts))
    # The 30-token system prompt is 7 full pages; a request admitted after the first one's
    # prefill was dispatched finds them (the batch budget of 32 tokens spreads admissions).
    assert stats.hits >= 7 * BS * 5
    assert on.engine.num_prefill_tokens == sum(map(len, prompts)) - stats.hits
    assert on.engine.num_prefill_tokens < off.engine.num_prefill_tokens
    assert on.engine.blocks.all_free() and off.engine.blocks.all_free()
    # Again: now every request maps its whole cached prefix (all but its last partial page).
    before = stats.hits
    assert run(on, prompts) == ref
    assert stats.hits - before == sum((len(p) - 1) // BS * BS for p in prompts)
    assert on.engine.blocks.all_free()


def test_multi_round_conversation_prefills_only_the_new_turn():
    llm = make_llm()
    eng = llm.engine
    rng = np.random.default_rng(7)
    convs = random_prompts(3, [6, 9, 3], seed=8)   # the last round's 3 x 56 tokens fit the pool
    for _ in range(3):
        outs = run(llm, convs)
        assert outs == reference_greedy(convs, GREEDY.max_tokens)
        convs = [c + o + [int(t) for t in rng.integers(0, 256, size=5)] for c, o in zip(convs, outs)]
    prefilled, hits = eng.num_prefill_tokens, eng.prefix_cache_stats.hits
    outs = run(llm, convs)
    assert outs == reference_greedy(convs, GREEDY.max_tokens)
    # Round 4: the previous round's prompt and all but its last output token are cached
    # (that token's K/V is never written), so each prefill is the page tail + 6 new tokens.
    computed = eng.num_prefill_tokens - prefilled
    assert computed <= len(convs) * (BS + 6) and eng.scheduler.num_preemptions == 0
    assert eng.prefix_cache_stats.hits - hits == sum(map(len, convs)) - computed
    assert eng.blocks.all_free()


def test_cached_pages_are_evicted_instead_of_preempting():
    # Fill the pool's cache with other prompts, then a batch that fits the pool exactly.
    llm = make_llm()
    eng = llm.engine
    filler = random_prompts(3, [56, 56, 56], seed=11)
    for p in filler:
        run(llm, [p])
    assert eng.blocks.prefix_cache.num_evictable > 30 and eng.blocks.all_free()
    batch = random_prompts(4, [36, 36, 36, 36], seed=12)   # 4 x (36 + 8) tokens = 44 of 47 pages
    preempted = eng.scheduler.num_preemptions
    assert run(llm, batch) == reference_greedy(batch, GREEDY.max_tokens)
    assert eng.scheduler.num_preemptions == preempted
    assert eng.prefix_cache_stats.evictions > 0 and eng.blocks.all_free()


def test_abort_preempt_and_reset_leave_no_page_behind():
    llm = make_llm()
    eng = llm.engine
    prompts = shared_prompts(16, system_len=40, seed=13)
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    stream = llm.stream(prompts, long)
    for _ in range(10):
        next(stream)
    stream.close()                              # aborts every request mid-flight
    assert eng.blocks.prefix_cache.num_cached > 0 and eng.blocks.all_free()
    while eng.has_unfinished():                 # the in-flight batch drains
        eng.step()
    assert eng.blocks.all_free()
    # Preemption with shared pages: 16 requests of ~80 tokens do not fit 47 pages at once.
    assert run(llm, prompts, long) == reference_greedy(prompts, long.max_tokens)
    assert eng.scheduler.num_preemptions > 0 and eng.blocks.all_free()
    assert eng.blocks.prefix_cache.num_cached > 0
    assert llm.reset_prefix_cache() is True
    assert eng.blocks.prefix_cache.num_cached == 0 and eng.blocks.all_free()
    hits = eng.prefix_cache_stats.hits
    run(llm, prompts[:1])
    assert eng.prefix_cache_stats.hits == hits, "nothing is cached after a reset"
    assert make_llm(enable_prefix_caching=False).reset_prefix_cache() is False


def test_command_line_flag():
    parser = build_parser()
    assert "enable_prefix_caching" not in engine_args(parser.parse_args(["hi"]))
    assert engine_args(parser.parse_args(["hi", "--no-enable-prefix-caching"]))["enable_prefix_caching"] is False
    assert engine_args(parser.parse_args(["hi", "--enable-prefix-caching"]))["enable_prefix_caching"] is True


@pytest.mark.slow
def test_default_model_chat_rounds_match_without_cache_across_a_restart(default_gguf_path, tmp_path):
    kw = dict(max_model_len=512, max_num_batched_tokens=64, num_kv_pages=64, show_progress=False)
    offload = dict(kv_offload_host_gb=0.05, kv_offload_disk_path=str(tmp_path), kv_offload_disk_gb=0.2)
    on = LLM(str(default_gguf_path), **kw, **offload)
    off = LLM(str(default_gguf_path), enable_prefix_caching=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    system = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}
    convs = [[system, {"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a color.")]

    def same(llm: LLM) -> list:
        a, b = llm.chat(convs, params), off.chat(convs, params)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
        return a

    for follow_up in ("And of Italy?", "Another one?"):
        convs = [c + [{"role": "assistant", "content": o.outputs[0].text}, {"role": "user", "content": follow_up}]
                 for c, o in zip(convs, same(on))]
    same(on)
    stats = on.engine.prefix_cache_stats
    assert stats.hits > stats.queries / 2
    assert on.engine.num_prefill_tokens * 2 < off.engine.num_prefill_tokens
    assert on.engine.blocks.all_free()
    # A new engine over the same disk folder reloads the conversations' pages.
    on.engine.offload.disk.close()
    del on
    restarted = LLM(str(default_gguf_path), **kw, **offload)
    eng = restarted.engine
    ids = [eng.add_request(t, params, add_special_tokens=False) for t in restarted._render_chat(convs, True)]
    eng.offload.settle()   # add_request queued the disk reads: let them land first
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o.outputs[0].token_ids) for o in eng.step() if o.finished)
    assert [done[i] for i in ids] == [o.outputs[0].token_ids for o in off.chat(convs, params)]
    assert eng.offload.stats.loaded_pages > 0 and eng.offload.stats.disk_hits > 0
    assert eng.blocks.all_free()
