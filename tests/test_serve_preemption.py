"""Preemption by swapping (serve/swap.py) and the engine's per-phase step metrics (serve/phases.py).

Exactness is checked as in test_serve_engine.py: a workload whose tiny block pool forces
preemptions returns the same tokens under swap, recompute and auto as with a pool so large
that nothing is preempted, for greedy and seeded sampling.
"""

import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_serve_engine import NumberTokenizer, random_prompts, tiny_model

from genforge.generate.sampling import SamplingParams
from genforge.serve.blocks import BlockManager
from genforge.serve.engine import Engine, Request
from genforge.serve.metrics import ServerMetrics
from genforge.serve.paged_cache import PagedKVCache
from genforge.serve.phases import position_phases
from genforge.serve.scheduler import Sequence
from genforge.serve.swap import Preemptor, SwapSpace

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = dict(block_size=4, num_blocks=64, max_num_seqs=16, max_num_batched_tokens=20)


def params(kind: str, i: int, limit: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0, max_new_tokens=limit)
    return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_new_tokens=limit)


def serve(engine: Engine, prompts, limits, kind: str, watch_steps=None) -> tuple[dict, dict]:
    """Tokens and the finished outputs of every request, run to the end."""
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(Request(str(i), prompt, params(kind, i, limit)))
    tokens: dict[str, list[int]] = {}
    finished = {}
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        if watch_steps is not None:
            watch_steps.append(time.perf_counter() - start)
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished[out.request_id] = out
    return tokens, finished


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_swap_recompute_and_no_preemption_give_the_same_tokens(kind, tmp_path):
    model = tiny_model()
    prompts, limits = random_prompts(20, seed=3)
    alone, _ = serve(Engine(model, NumberTokenizer(), block_size=4, num_blocks=512), prompts, limits, kind)
    runs = {
        "recompute": dict(preemption_mode="recompute"),
        "swap": dict(preemption_mode="swap"),
        "auto": dict(preemption_mode="auto"),
        # No host memory: every swap spills to disk.
        "disk": dict(preemption_mode="swap", swap_space=0, swap_disk_space=1 << 30, swap_dir=tmp_path / "spill"),
    }
    for name, options in runs.items():
        engine = Engine(model, NumberTokenizer(), **TIGHT, **options)
        tokens, _ = serve(engine, prompts, limits, kind)
        stats = engine.stats()
        assert stats.preemptions > 0, name
        assert tokens == alone, name
        assert stats.kv_blocks_used == 0, name
        assert engine.swap_space is None or not engine.swap_space.records, name
        if name == "recompute":
            assert stats.swap_preemptions == 0 and stats.phases.tokens["recompute"] > 0
        elif name in ("swap", "disk"):
            # Every preemption swapped and came back; nothing was computed twice.
            assert stats.swap_preemptions == stats.preemptions == stats.swap.swapped_in
            assert stats.phases.tokens["recompute"] == 0 and 0 < stats.swap.bytes_in <= stats.swap.bytes_out
            # Blocks still in the prefix cache come back by reference; the others are copied.
            reused = stats.swap.blocks_reused * engine.swap_space.bytes_per_block
            assert stats.swap.bytes_in + reused == stats.swap.bytes_out
            assert stats.swap.blocks_reused > 0
    assert stats.swap.spilled == stats.preemptions
    assert list((tmp_path / "spill").iterdir()) == []  # every spill file read back and removed


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_swapped_blocks_come_back_bit_for_bit_through_host_and_disk(kv_cache_dtype, tmp_path):
    config = tiny_model().config
    cache = PagedKVCache(config, num_blocks=16, block_size=4, kv_cache_dtype=kv_cache_dtype)
    generator = torch.Generator().manual_seed(0)
    for pool in [*cache.keys, *cache.values, *cache.key_scales, *cache.value_scales]:
        if pool.dtype == torch.int8:
            pool.copy_(torch.randint(-128, 128, pool.shape, generator=generator, dtype=torch.int8))
        else:
            pool.copy_(torch.randn(pool.shape, generator=generator))
    pools = lambda: [*cache.keys, *cache.values, *cache.key_scales, *cache.value_scales]  # noqa: E731
    rows = lambda blocks: [p.view(16, -1)[blocks].clone() for p in pools()]  # noqa: E731
    space = SwapSpace(cache, host_bytes=3 * cache_block_bytes(cache), disk_bytes=1 << 20, directory=tmp_path)
    assert space.bytes_per_block == PagedKVCache.bytes_per_block(config, 4, torch.float32, kv_cache_dtype)
    a, b = [3, 7, 1], [9, 0]
    before_a, before_b = rows(a), rows(b)
    assert space.tier_for(3) == "host" and space.tier_for(4) == "disk"
    space.swap_out("a", a, "host")
    assert space.tier_for(2) == "disk"  # the host tier is full now
    space.swap_out("b", b, "disk")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary left beside it
    for pool in pools():  # the freed blocks are reused by others
        pool.view(16, -1)[a + b] = 0
    space.swap_in("b", [12, 4, 15])  # a larger table than it left with: only its first blocks are filled
    space.swap_in("a", [5, 10, 2])
    for old, new in zip(before_a, rows([5, 10, 2])):
        assert torch.equal(old, new)
    for old, new in zip(before_b, rows([12, 4])):
        assert torch.equal(old, new)
    assert list(tmp_path.iterdir()) == [] and space.host_used == space.disk_used == 0
    assert space.counters.swapped_out == space.counters.swapped_in == 2 and space.counters.spilled == 1


def cache_block_bytes(cache: PagedKVCache) -> int:
    pools = [*cache.keys, *cache.values, *cache.key_scales, *cache.value_scales]
    return sum(p[: cache.block_size].numel() * p.element_size() for p in pools)


def test_spill_files_are_written_atomically_and_removed_on_abort_and_close(tmp_path, monkeypatch):
    cache = PagedKVCache(tiny_model().config, num_blocks=8, block_size=4)
    space = SwapSpace(cache, host_bytes=0, disk_bytes=1 << 20, directory=tmp_path)

    def broken_save(obj, path):  # a crash halfway through writing the file
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            space.swap_out("x", [0, 1], "disk")
    assert list(tmp_path.iterdir()) == [] and not space.holds("x")
    space.swap_out("y", [2], "disk")
    assert len(list(tmp_path.iterdir())) == 1
    space.discard("y")  # an aborted sequence's file goes with it
    assert list(tmp_path.iterdir()) == [] and space.disk_used == 0
    # A space that made its own directory removes it when closed.
    own = SwapSpace(cache, host_bytes=0, disk_bytes=1 << 20)
    own.swap_out("z", [3], "disk")
    directory = own._directory
    assert directory.is_dir() and len(list(directory.iterdir())) == 1
    own.close()
    assert not directory.exists()


def test_aborting_a_swapped_out_request_frees_its_swap_space():
    model = tiny_model()
    prompts, limits = random_prompts(16, seed=4)
    engine = Engine(model, NumberTokenizer(), **TIGHT, preemption_mode="swap")
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(Request(str(i), prompt, params("greedy", i, limit)))
    for _ in range(200):
        engine.step()
        if engine.swap_space.records:
            break
    swapped = next(iter(engine.swap_space.records))
    assert engine.swap_space.host_used > 0
    engine.abort(swapped.request_id)
    assert swapped not in engine.swap_space.records
    engine.close()
    assert engine.swap_space.host_used == 0 and engine.stats().kv_blocks_used == 0


def test_auto_mode_swaps_when_the_copy_is_cheaper_than_the_prefill_it_saves():
    model = tiny_model()
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    blocks = BlockManager(16, 4)
    space = SwapSpace(cache, host_bytes=1 << 20)
    rate = {"value": None}
    preemptor = Preemptor("auto", space, blocks, lambda: rate["value"])
    seq = Sequence("s", list(range(22)), 22, 0, state=None)
    seq.block_table = [blocks.allocate() for _ in range(6)]
    seq.num_computed = 21
    other = Sequence("t", list(range(10)), 10, 1, state=None)  # shares the first two blocks
    other.block_table = seq.block_table[:2]
    for block in other.block_table:
        blocks.ref_counts[block] += 1
    decision = preemptor._decide(seq)
    # 6 blocks to move; the 8 tokens another sequence holds come back from the prefix cache.
    assert decision.blocks == 6 and decision.tokens_to_recompute == 13
    assert not decision.swapped and decision.recompute_seconds is None  # no prefill measured yet
    per_block = space.seconds_per_block("host")
    rate["value"] = 10 * per_block * 6 / 13  # prefill 10x dearer than the copy
    assert preemptor._decide(seq).swapped
    rate["value"] = 0.1 * per_block * 6 / 13
    assert not preemptor._decide(seq).swapped
    assert Preemptor("swap", space, blocks, lambda: None)._decide(seq).swapped
    assert not Preemptor("recompute", space, blocks, lambda: 1.0)._decide(seq).swapped
    full = SwapSpace(cache, host_bytes=5 * space.bytes_per_block)  # too small for 6 blocks
    assert not Preemptor("swap", full, blocks, lambda: 1.0)._decide(seq).swapped
    with pytest.raises(ValueError, match="preemption_mode must be one of 'auto', 'swap', 'recompute'"):
        Engine(model, None, preemption_mode="never")
    with pytest.raises(ValueError, match="swap_space and swap_disk_space must be >= 0"):
        Engine(model, None, swap_space=-1)


def test_position_phases_split_prefill_decode_and_recompute():
    assert position_phases(0, 10, num_prompt_tokens=6, computed_before=0) == {
        "recompute": 0,
        "prefill": 6,
        "decode": 4,
    }
    assert position_phases(4, 10, num_prompt_tokens=6, computed_before=9) == {
        "recompute": 5,
        "prefill": 0,
        "decode": 5,
    }
    assert position_phases(2, 3, num_prompt_tokens=20, computed_before=3) == {
        "recompute": 1,
        "prefill": 2,
        "decode": 0,
    }


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_phase_counters_add_up_to_step_time_and_served_tokens(mode):
    model = tiny_model()
    prompts, limits = random_prompts(16, seed=6)
    shared = list(range(50, 74))  # a prefix later requests find in the prefix cache
    prompts = [shared + p if i % 3 == 0 else p for i, p in enumerate(prompts)]
    engine = Engine(model, NumberTokenizer(), **TIGHT, preemption_mode=mode)
    wall: list[float] = []
    _, finished = serve(engine, prompts, limits, "greedy", watch_steps=wall)
    stats = engine.stats()
    phases = stats.phases
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    # Time: the phases are the step, and the step is what the caller waited for.
    assert sum(phases.seconds.values()) == pytest.approx(phases.step_seconds, rel=1e-9)
    assert 0.7 * sum(wall) <= phases.step_seconds <= sum(wall)
    assert phases.seconds["prefill"] > 0 and phases.seconds["decode"] > 0
    assert (phases.seconds["recompute"] > 0) == (mode == "recompute") == (phases.seconds["swap"] == 0)
    assert phases.steps == len(wall) and phases.mixed_steps > 0
    assert sum(phases.last_step_share.values()) == pytest.approx(1.0)
    # Tokens: prompts less their cached prefixes were prefilled once; every generated token
    # but the first (sampled after the prefill) and the last (never fed back) was decoded.
    assert phases.tokens["prefill"] == sum(o.prompt_tokens - o.cached_prompt_tokens for o in finished.values())
    assert phases.tokens["decode"] == sum(o.completion_tokens - 1 for o in finished.values())
    assert sum(o.completion_tokens for o in finished.values()) == stats.generation_tokens_total
    assert (phases.tokens["recompute"] > 0) == (mode == "recompute")

    class OneEngine:  # what the metrics collector reads: AsyncEngine.stats(model)
        def stats(self, model):
            return stats

    text = ServerMetrics(OneEngine(), ["m"]).render().decode()
    samples = {
        (s.name, s.labels.get("phase") or s.labels.get("direction")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    phase_seconds = [samples["genforge_engine_phase_seconds_total", p] for p in phases.seconds]
    assert sum(phase_seconds) == pytest.approx(samples["genforge_engine_step_seconds_total", None], rel=1e-9)
    assert samples["genforge_engine_phase_tokens_total", "prefill"] == phases.tokens["prefill"]
    assert samples["genforge_engine_phase_tokens_total", "decode"] == phases.tokens["decode"]
    assert samples["genforge_engine_steps_total", None] == phases.steps
    assert samples["genforge_preemptions_swapped_total", None] == stats.swap_preemptions
    share = sum(samples["genforge_engine_last_step_phase_share", p] for p in phases.seconds)
    assert share == pytest.approx(1.0)
    if mode == "swap":
        assert samples["genforge_kv_swap_bytes_total", "out"] == stats.swap.bytes_out > 0


def test_serve_cli_takes_the_preemption_settings():
    from genforge.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m"])
    assert (args.preemption_mode, args.swap_space_gib, args.swap_disk_gib, args.swap_dir) == ("auto", 4.0, 0.0, None)
    args = parser.parse_args(
        ["serve", "--model", "m", "--preemption-mode", "swap", "--swap-space-gib", "0.5", "--swap-disk-gib", "2"]
    )
    assert (args.preemption_mode, args.swap_space_gib, args.swap_disk_gib) == ("swap", 0.5, 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--preemption-mode", "never"])
