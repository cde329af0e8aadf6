"""The serving engine: paged cache, continuous batching, prefix caching, preemption.

The reference for every output is genforge's simple generator (`generate`), itself checked
token for token against transformers' `generate` in test_generate_generator.py: a request served
among many must return exactly what it returns alone.
"""

import asyncio
import itertools
import json
import random

import factories
import pytest
import torch

from genforge.checkpoint import load_model
from genforge.generate.constrained import JsonSchemaConstraint
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams, token_logprobs
from genforge.model import Transformer
from genforge.serve.blocks import BlockManager, OutOfBlocks
from genforge.serve.engine import AsyncEngine, Engine, Request
from genforge.serve.paged_cache import PagedKVCache
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300


class NumberTokenizer:
    """Token i reads "<i>"; enough for engines that need no real text."""

    eos_token_id = None
    vocab_size = VOCAB

    def stream_decoder(self, skip_special_tokens=False):
        class Decoder:
            def prime(self, ids):
                pass

            def step(self, token):
                return f"<{token}>"

            def finish(self):
                return ""

        return Decoder()


def tiny_model(family="llama", seed=0, **overrides) -> Transformer:
    """The decoder of factories.py at this file's sizes, ready to decode."""
    sizes = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256, eos_token_id=None
    )
    return factories.tiny_model(seed, family=family, **(sizes | overrides)).eval()


def random_prompts(count, seed=0, longest=60):
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(count)]
    limits = [rng.randint(1, 40) for _ in range(count)]
    return prompts, limits


def run_to_end(engine: Engine) -> dict[str, dict]:
    results: dict[str, dict] = {}
    while engine.has_unfinished():
        for out in engine.step():
            entry = results.setdefault(out.request_id, {"tokens": [], "text": "", "logprobs": []})
            entry["tokens"] += out.token_ids
            entry["text"] += out.text
            entry["logprobs"] += out.logprobs or []
            if out.finished:
                entry["reason"], entry["usage"] = out.finish_reason, (out.prompt_tokens, out.completion_tokens)
    return results


def greedy(n):
    return SamplingParams(temperature=0, max_new_tokens=n)


def reference(model, prompt, params, tokenizer=None, eos=()):
    return generate(model, [prompt], params, tokenizer=tokenizer, eos_token_ids=list(eos))[0]


# ------------------------------------------------------------------------- block manager
def test_block_manager_counts_references_and_evicts_least_recently_released():
    blocks = BlockManager(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4]
    table = [blocks.allocate(), blocks.allocate()]
    hashes: list[int] = []
    blocks.cache_full_blocks(tokens, table, num_computed=4, hashes=hashes)
    assert len(hashes) == 2 and blocks.num_free == 1

    shared, shared_hashes = blocks.cached_prefix(tokens + [5], max_tokens=5)
    assert shared == table and shared_hashes == hashes
    assert blocks.ref_counts[table[0]] == 2
    blocks.free(shared)
    blocks.free(table)
    assert blocks.num_free == 3 and blocks.num_used == 0

    # Cached blocks survive being released until allocation needs them, oldest release first.
    again, _ = blocks.cached_prefix(tokens, max_tokens=4)
    assert again == table
    blocks.free(again)
    assert [blocks.allocate() for _ in range(2)] == [2, table[0]]
    assert blocks.cached_prefix(tokens, max_tokens=4)[0] == []  # the first block's entry was evicted
    blocks.allocate()
    with pytest.raises(OutOfBlocks):
        blocks.allocate()
    with pytest.raises(RuntimeError, match="freed more often"):
        blocks.free([0, 0, 0])


def test_prefix_hash_depends_on_everything_before_the_block():
    blocks = BlockManager(num_blocks=4, block_size=2)
    table = [blocks.allocate(), blocks.allocate()]
    blocks.cache_full_blocks([1, 2, 3, 4], table, 4, [])
    # Same second block after a different first block: no hit.
    assert blocks.cached_prefix([9, 9, 3, 4], max_tokens=4)[0] == []
    assert blocks.counters.queries == 1 and blocks.counters.hits == 0


def test_paged_batch_gives_the_same_attention_as_a_contiguous_cache():
    model = tiny_model()
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    prompt = torch.randint(0, VOCAB, (1, 11))
    # Blocks deliberately out of order in the pool.
    table = [9, 2, 14]
    with torch.inference_mode():
        view = cache.batch([table], [0], 11)
        paged = model(prompt, attention_mask=view.attention_mask, position_ids=view.position_ids, cache=view).logits
        plain = model(prompt).logits
        torch.testing.assert_close(paged, plain, atol=1e-5, rtol=1e-5)
        step = torch.tensor([[7]])
        view = cache.batch([table], [11], 1)
        paged_next = model(step, attention_mask=view.attention_mask, position_ids=view.position_ids, cache=view)
        plain_next = model(torch.cat([prompt, step], 1)).logits[:, -1]
        torch.testing.assert_close(paged_next.logits[:, -1], plain_next, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ batching
@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 8}),  # windows compare token positions, not cache slots
        ("gpt2", {"num_kv_heads": 4}),  # learned positions
    ],
)
def test_32_concurrent_greedy_requests_equal_each_request_alone(family, overrides):
    model = tiny_model(family, **overrides)
    prompts, limits = random_prompts(32)
    engine = Engine(model, NumberTokenizer(), block_size=8, num_blocks=128, max_num_seqs=32, max_num_batched_tokens=96)
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(Request(str(i), prompt, greedy(limit)))
    results = run_to_end(engine)
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        expected = reference(model, prompt, greedy(limit))
        assert results[str(i)]["tokens"] == expected.token_ids, f"request {i}"
        assert results[str(i)]["reason"] == "length"
        assert results[str(i)]["usage"] == (len(prompt), limit)
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("resident_kv_memory", [None, 0])  # resident buffers, and gathering blocks
def test_preemption_and_chunked_prefill_keep_outputs_exact(resident_kv_memory):
    model = tiny_model()
    prompts, limits = random_prompts(24, seed=1)
    # Few blocks and a small budget: sequences get preempted and prompts split into chunks.
    engine = Engine(
        model,
        NumberTokenizer(),
        block_size=4,
        num_blocks=64,
        max_num_seqs=16,
        max_num_batched_tokens=20,
        resident_kv_memory=resident_kv_memory,
    )
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(Request(str(i), prompt, greedy(limit)))
    scheduled_tokens = []
    original = engine.scheduler.schedule

    def watched():
        chunks = original()
        scheduled_tokens.append(sum(c.num_tokens for c in chunks))
        return chunks

    engine.scheduler.schedule = watched
    results = run_to_end(engine)
    assert engine.stats().preemptions > 0
    assert max(scheduled_tokens) <= 20
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        assert results[str(i)]["tokens"] == reference(model, prompt, greedy(limit)).token_ids, f"request {i}"
    assert engine.stats().kv_blocks_used == 0


def test_long_prompt_is_prefilled_in_chunks_while_decodes_continue():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=8, max_num_batched_tokens=16)
    engine.add_request(Request("short", [1, 2, 3], greedy(30)))
    engine.step()  # the short request's prompt
    engine.add_request(Request("long", list(range(5, 165)), greedy(3)))
    decoded_while_long_prefills = 0
    for _ in range(5):
        outs = engine.step()
        decoded_while_long_prefills += sum(o.request_id == "short" for o in outs)
        assert not any(o.request_id == "long" for o in outs)  # still in its prefill chunks
    assert decoded_while_long_prefills == 5
    results = run_to_end(engine)
    assert results["long"]["tokens"] == reference(model, list(range(5, 165)), greedy(3)).token_ids


def test_prefix_cache_reuses_blocks_of_a_shared_prompt():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=8)
    shared = list(range(10, 90))  # ten full blocks
    engine.add_request(Request("first", shared + [1, 2], greedy(5)))
    first = run_to_end(engine)["first"]["tokens"]
    hits = engine.stats().prefix_cache_hits
    engine.add_request(Request("second", shared + [3], greedy(5)))
    first_step = engine.step()
    assert engine.stats().prefix_cache_hits - hits == 10
    assert first_step[0].cached_prompt_tokens == 80
    second = first_step[0].token_ids + run_to_end(engine)["second"]["tokens"]
    assert first == reference(model, shared + [1, 2], greedy(5)).token_ids
    assert second == reference(model, shared + [3], greedy(5)).token_ids


def test_identical_prompts_recompute_their_last_block():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=4)
    prompt = list(range(16))  # exactly four full blocks
    for name in ("a", "b"):
        engine.add_request(Request(name, prompt, greedy(6)))
        run_to_end(engine)
    engine.add_request(Request("c", prompt, greedy(6)))
    assert run_to_end(engine)["c"]["tokens"] == reference(model, prompt, greedy(6)).token_ids


# ------------------------------------------------------------------------ sampling
def test_seeded_sampling_is_independent_of_the_batch_and_matches_generate():
    model = tiny_model()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=12, seed=7)
    prompt = [5, 6, 7, 8]
    alone = Engine(model, NumberTokenizer())
    alone.add_request(Request("x", prompt, params))
    expected = run_to_end(alone)["x"]["tokens"]
    busy = Engine(model, NumberTokenizer())
    prompts, _ = random_prompts(8, seed=3)
    for i, p in enumerate(prompts):
        busy.add_request(Request(f"other{i}", p, SamplingParams(temperature=1.0, max_new_tokens=10, seed=i)))
    busy.add_request(Request("x", prompt, params))
    assert run_to_end(busy)["x"]["tokens"] == expected
    assert expected == reference(model, prompt, params).token_ids


def test_penalties_and_bias_per_request_match_generate():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer())
    settings = {
        "rep": SamplingParams(temperature=0, repetition_penalty=1.8, max_new_tokens=15),
        "freq": SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, max_new_tokens=15),
        "ngram": SamplingParams(temperature=0, no_repeat_ngram_size=2, max_new_tokens=15),
        "bias": SamplingParams(temperature=0, logit_bias={3: 100.0}, max_new_tokens=4),
        "plain": greedy(15),
    }
    prompts = {name: [10 + i, 20, 30 + 2 * i] for i, name in enumerate(settings)}
    for name, params in settings.items():
        engine.add_request(Request(name, prompts[name], params))
    results = run_to_end(engine)
    for name, params in settings.items():
        assert results[name]["tokens"] == reference(model, prompts[name], params).token_ids, name
    assert results["bias"]["tokens"] == [3, 3, 3, 3]


def test_a_steady_batch_builds_its_processors_once(monkeypatch):
    import genforge.serve.engine as engine_module

    model = tiny_model()
    engine = Engine(model, NumberTokenizer())
    settings = {
        "sampled": SamplingParams(temperature=0.8, top_k=40, max_new_tokens=12, seed=1),
        "penalised": SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=0.5, max_new_tokens=12),
        "short": SamplingParams(temperature=0, no_repeat_ngram_size=2, min_new_tokens=2, max_new_tokens=5),
    }
    prompts = {name: [10 + i, 20, 30 + 2 * i] for i, name in enumerate(settings)}
    for name, params in settings.items():
        engine.add_request(Request(name, prompts[name], params))
    built = []
    original = engine_module.batch_logits_processors

    def counted(requests, *args, **kwargs):
        built.append(len(requests))
        return original(requests, *args, **kwargs)

    monkeypatch.setattr(engine_module, "batch_logits_processors", counted)
    results = run_to_end(engine)
    # All three rows for five steps, then the two left until the end: two batches, two builds.
    assert built == [3, 2]
    for name, params in settings.items():
        assert results[name]["tokens"] == reference(model, prompts[name], params).token_ids, name


def test_logprobs_are_the_raw_model_log_softmax():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer())
    prompt = [4, 5, 6]
    engine.add_request(Request("x", prompt, SamplingParams(temperature=0.7, max_new_tokens=3, seed=1), logprobs=3))
    result = run_to_end(engine)["x"]
    ids = prompt + result["tokens"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
    expected = token_logprobs(logits, torch.tensor(result["tokens"]), top_n=3)
    for i, entry in enumerate(result["logprobs"]):
        assert entry.token_id == result["tokens"][i]
        assert entry.logprob == pytest.approx(float(expected.logprobs[i]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected.top_token_ids[i].tolist()


def test_padded_vocabulary_ids_are_never_chosen():
    """An embedding table padded past the tokenizer (320 rows for 300 tokens), whose padding
    rows would win every argmax: greedy rows (taken by one argmax over the text ids, no
    processor) must choose exactly what `generate` with the tokenizer's ban chooses."""
    model = tiny_model(vocab_size=VOCAB + 20)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = model.lm_head.weight[:VOCAB].abs().max() * 50
    engine = Engine(model, NumberTokenizer())
    prompts, _ = random_prompts(3, seed=4)
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(str(i), prompt, greedy(12)))
    assert all(seq.state.plain_greedy for seq in engine._sequences.values())
    results = run_to_end(engine)
    for i, prompt in enumerate(prompts):
        tokens = results[str(i)]["tokens"]
        assert tokens == reference(model, prompt, greedy(12), tokenizer=NumberTokenizer()).token_ids
        assert max(tokens) < VOCAB


# ------------------------------------------------------------------- stop and abort
def test_stop_token_eos_and_stop_strings(text_model_dir):
    model, tokenizer = load_model(text_model_dir), Tokenizer.from_dir(text_model_dir)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the weather today is", add_special_tokens=False)
    free = reference(model, prompt, greedy(20), tokenizer=tokenizer, eos=[])
    assert len(free.token_ids) == 20
    stop_token = free.token_ids[5]
    stop_text = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    engine.add_request(Request("eos", prompt, greedy(20), ignore_eos=False))
    engine.add_request(
        Request("stop_id", prompt, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[stop_token]))
    )
    engine.add_request(Request("stop_str", prompt, SamplingParams(temperature=0, max_new_tokens=20, stop=[stop_text])))
    results = run_to_end(engine)
    assert results["stop_id"]["tokens"] == free.token_ids[: free.token_ids.index(stop_token) + 1]
    assert results["stop_id"]["reason"] == "stop"
    assert results["stop_str"]["reason"] == "stop"
    assert results["stop_str"]["text"] == free.text[: free.text.index(stop_text)]
    expected = reference(model, prompt, greedy(20), tokenizer=tokenizer)
    assert results["eos"]["tokens"] == expected.token_ids and results["eos"]["text"] == expected.text


def test_abort_frees_blocks_at_once():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=4)
    engine.add_request(Request("x", list(range(40)), greedy(50)))
    engine.add_request(Request("y", list(range(5)), greedy(50)))
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    final = engine.abort("x")
    assert final.finished and final.finish_reason == "abort"
    assert engine.abort("nope") is None
    engine.abort("y")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()


def test_abort_all_stops_every_request_and_frees_their_blocks():
    engine = Engine(tiny_model(), NumberTokenizer(), block_size=4)
    for name, prompt in (("x", list(range(40))), ("y", list(range(5))), ("z", [1, 2])):
        engine.add_request(Request(name, prompt, greedy(50)))
    engine.step()
    finals = engine.abort_all()
    assert sorted(out.request_id for out in finals) == ["x", "y", "z"]
    assert all(out.finished and out.finish_reason == "abort" for out in finals)
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    assert engine.abort_all() == []


def test_a_request_longer_than_the_context_is_a_context_length_error():
    from genforge.generate.request import ContextLengthError

    engine = Engine(tiny_model(), NumberTokenizer())
    with pytest.raises(ContextLengthError, match="maximum context length is 256 tokens"):
        engine.add_request(Request("x", [1] * 250, greedy(10)))
    engine.add_request(Request("x", [1] * 250, greedy(6)))  # exactly fits


def test_bad_requests_are_refused_before_any_work():
    engine = Engine(tiny_model(), NumberTokenizer())
    with pytest.raises(ValueError, match="maximum context length is 256 tokens, but 250 prompt tokens and 10"):
        engine.add_request(Request("x", [1] * 250, greedy(10)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("x", [], greedy(1)))
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        engine.add_request(Request("x", [300], greedy(1)))
    with pytest.raises(ValueError, match="max_new_tokens must be set"):
        engine.add_request(Request("x", [1], SamplingParams()))
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(tiny_model(), NumberTokenizer(), block_size=16, num_blocks=3)
    assert not engine.has_unfinished()


def test_json_schema_constraint_per_request_matches_generate(bpe_model, bpe_tokenizer):
    model, tokenizer = bpe_model, bpe_tokenizer
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("answer:", add_special_tokens=False)
    params = [SamplingParams(temperature=1.0, top_k=8, max_new_tokens=40, seed=seed) for seed in range(4)]
    for seed in range(4):
        engine.add_request(
            Request(f"c{seed}", prompt, params[seed], processors=[JsonSchemaConstraint(schema, tokenizer)])
        )
    engine.add_request(Request("free", prompt, params[0]))
    results = run_to_end(engine)
    for seed in range(4):
        entry = results[f"c{seed}"]
        expected = generate(
            model,
            [prompt],
            params[seed],
            tokenizer=tokenizer,
            extra_processors=[JsonSchemaConstraint(schema, tokenizer)],
        )[0]
        assert entry["tokens"] == expected.token_ids and entry["reason"] == "stop"
        assert set(json.loads(entry["text"])) == {"n"}
    assert results["free"]["tokens"] != results["c0"]["tokens"]  # the constraint, not the seed, shaped them


# ---------------------------------------------------------------------------- async
def test_async_engine_streams_cancels_and_drains():
    model = tiny_model()
    engines = {"a": Engine(model, NumberTokenizer()), "b": Engine(tiny_model(seed=1), NumberTokenizer())}
    served = AsyncEngine(engines)

    async def collect(model_name, request_id, prompt, limit):
        tokens = []
        async for out in served.generate(model_name, Request(request_id, prompt, greedy(limit))):
            tokens += out.token_ids
        return tokens

    async def cancel_early():
        stream = served.generate("a", Request("cancelled", [1, 2, 3], greedy(200)))
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(
            collect("a", "r1", [1, 2, 3], 10), collect("b", "r2", [1, 2, 3], 10), cancel_early()
        )
        with pytest.raises(ValueError, match="maximum context length"):
            await collect("a", "too-long", [1] * 300, 5)
        with pytest.raises(KeyError, match="available: a, b"):
            await collect("zzz", "r3", [1], 1)
        slow = asyncio.create_task(collect("a", "drained", [4, 5], 30))
        await asyncio.sleep(0.05)
        await served.shutdown(drain_timeout=30)
        return results, await slow

    (first, second, _), drained = asyncio.run(main())
    assert first == reference(model, [1, 2, 3], greedy(10)).token_ids
    assert second == reference(engines["b"].model, [1, 2, 3], greedy(10)).token_ids
    assert len(drained) == 30  # shutdown let the in-flight request finish
    for engine in engines.values():
        assert engine.stats().kv_blocks_used == 0


def test_async_engine_touches_its_engine_only_from_the_engine_thread():
    import threading

    engine = Engine(tiny_model(), NumberTokenizer())
    served = AsyncEngine({"a": engine})
    callers = set()
    for name in ("check_request", "add_request", "abort", "abort_all", "step", "stats", "has_unfinished"):
        method = getattr(engine, name)

        def watched(*args, _method=method, **kwargs):
            callers.add(threading.current_thread().name)
            return _method(*args, **kwargs)

        setattr(engine, name, watched)

    async def main():
        tokens = []
        async for out in served.generate("a", Request("r", [1, 2, 3], greedy(5))):
            tokens += out.token_ids
            served.stats("a")
        with pytest.raises(ValueError, match="maximum context length"):
            async for _ in served.generate("a", Request("long", [1] * 300, greedy(5))):
                pass
        stream = served.generate("a", Request("cut", [4, 5], greedy(100)))
        await stream.__anext__()
        await stream.aclose()
        await served.shutdown()
        return tokens

    assert asyncio.run(main()) == reference(engine.model, [1, 2, 3], greedy(5)).token_ids
    assert callers == {"genforge-engine-a"}
    assert served.stats("a").kv_blocks_used == 0 and served.stats("a").generation_tokens_total >= 6


@pytest.mark.parametrize("budget", [512, 7])  # whole prompt at once, and in chunks of 7 (and a chunk of 1)
def test_prompt_logprobs_score_every_prompt_token(budget):
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=4, max_num_batched_tokens=budget)
    prompt = list(range(3, 25))
    engine.add_request(Request("warm", prompt, greedy(2)))  # puts the prompt's blocks in the prefix cache
    run_to_end(engine)
    engine.add_request(Request("x", prompt, greedy(1), prompt_logprobs=2))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            first = first or out
    scored = first.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, :-1]
    expected = token_logprobs(logits, torch.tensor(prompt[1:]), top_n=2)
    assert [e.token_id for e in scored[1:]] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in scored[1:]]), expected.logprobs, atol=1e-4, rtol=0)
    assert [[t for t, _ in e.top] for e in scored[1:]] == expected.top_token_ids.tolist()


def test_decode_batches_split_by_length_and_stay_exact():
    model = tiny_model()
    # Splitting saves gathering work, so it applies when blocks are gathered (no resident buffers).
    engine = Engine(model, NumberTokenizer(), block_size=4, resident_kv_memory=0)
    prompts = [[7] * 3 for _ in range(6)] + [list(range(10, 130)) for _ in range(2)]
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), p, greedy(6)))
    groups = []
    original = engine._decode_groups

    def watched(singles):
        result = original(singles)
        groups.append([len(g) for g in result])
        return result

    engine._decode_groups = watched
    results = run_to_end(engine)
    assert [6, 2] in groups  # six short rows apart from the two long ones
    for i, p in enumerate(prompts):
        assert results[str(i)]["tokens"] == reference(model, p, greedy(6)).token_ids


def test_a_request_that_cannot_be_sampled_fails_alone():
    from genforge.generate.processors import LogitBias

    model = tiny_model()
    engine = Engine(model, NumberTokenizer())
    engine.add_request(Request("fine", [1, 2, 3], greedy(5)))
    # A per-request processor that bans every token: nothing is left to choose.
    engine.add_request(
        Request(
            "doomed",
            [4, 5],
            SamplingParams(temperature=1.0, max_new_tokens=5),
            processors=[LogitBias.ban(range(VOCAB), VOCAB)],
        )
    )
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    assert results["doomed"][-1].error and "every token masked" in results["doomed"][-1].error
    assert results["doomed"][-1].finish_reason == "error"
    assert sum(len(o.token_ids) for o in results["fine"]) == 5
    assert engine.stats().kv_blocks_used == 0


# ------------------------------------------------------------------ resident buffers
def assert_resident_rows_equal_blocks(engine: Engine) -> None:
    """Every running sequence holds a slot; slots are 0..n-1; each slot's filled positions
    equal the keys and values its blocks hold."""
    resident, cache, size = engine.resident, engine.cache, engine.blocks.block_size
    running = engine.scheduler.running
    assert set(resident.slot_of) == set(running)
    assert sorted(resident.slot_of.values()) == list(range(len(running)))
    for seq in running:
        slot, n = resident.slot_of[seq], seq.num_computed
        assert resident.lengths[slot] == n and resident.owners[slot] is seq
        positions = torch.arange(n)
        pool_slots = torch.tensor(seq.block_table)[positions // size] * size + positions % size
        for layer in range(engine.config.num_layers):
            for pool, buffer in (
                (cache.keys[layer], resident.keys[layer]),
                (cache.values[layer], resident.values[layer]),
            ):
                assert torch.equal(buffer[slot, :, :n], pool[pool_slots].transpose(0, 1)), (seq.request_id, layer)


def test_resident_rows_equal_the_blocks_through_admissions_preemptions_and_aborts():
    model = tiny_model()
    prompts, limits = random_prompts(20, seed=5)
    shared = list(range(40, 64))  # a prefix the later requests find in the prefix cache
    engine = Engine(
        model,
        NumberTokenizer(),
        block_size=4,
        num_blocks=64,
        max_num_seqs=12,
        max_num_batched_tokens=24,
        resident_kv_memory=1 << 24,
    )  # more than the tiny pool, so every step uses them
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(Request(str(i), (shared + prompt) if i % 3 == 0 else prompt, greedy(limit)))
    results: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        steps += 1
        assert steps < 1000, "the engine stopped making progress"
        if steps in (3, 9):  # abort whatever runs in the middle of the slots
            middle = engine.scheduler.running[len(engine.scheduler.running) // 2]
            engine.abort(middle.request_id)
            results.pop(middle.request_id, None)
        assert_resident_rows_equal_blocks(engine)
        # Waiting sequences hold no blocks: holding cached prefix blocks while waiting once
        # left nothing free and nothing running, forever.
        assert all(not seq.block_table for seq in engine.scheduler.waiting)
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    assert len(results) == 18
    for name, tokens in results.items():
        i = int(name)
        prompt = (shared + prompts[i]) if i % 3 == 0 else prompts[i]
        assert tokens == reference(model, prompt, greedy(limits[i])).token_ids, name
    # Finished: no slot and no block in use; the resident memory is kept for the next requests.
    assert not engine.resident.slot_of and 0 < engine.resident.memory <= engine.resident.memory_limit
    assert stats.kv_blocks_used == 0


def test_resident_buffers_fall_back_to_gathering_when_over_their_memory_limit():
    model = tiny_model()
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    # Room for 4 rows of 64 positions: a few short requests fit, 8 long ones do not.
    engine = Engine(model, NumberTokenizer(), block_size=8, resident_kv_memory=4 * 64 * per_token)
    short = [[3, 4, 5], [6, 7]]
    long = [list(range(i, i + 50)) for i in range(8)]
    tokens: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)

    for i, p in enumerate(short):
        engine.add_request(Request(f"s{i}", p, greedy(4)))
    step()
    assert len(engine.resident.slot_of) == 2 and engine.resident.memory <= engine.resident.memory_limit
    while engine.has_unfinished():
        step()
    for i, p in enumerate(long):
        engine.add_request(Request(f"l{i}", p, greedy(6 + 3 * i)))
    step()
    assert engine.resident.memory == 0  # too many long rows: this step gathered blocks
    resumed = False
    while engine.has_unfinished():
        step()
        if engine.resident.slot_of:  # few enough left: slots filled from the blocks again
            resumed = True
            assert_resident_rows_equal_blocks(engine)
    assert resumed
    for name, p in [(f"s{i}", p) for i, p in enumerate(short)] + [(f"l{i}", p) for i, p in enumerate(long)]:
        expected = reference(model, p, greedy(6 + 3 * int(name[1:]) if name[0] == "l" else 4)).token_ids
        assert tokens[name] == expected, name
    with pytest.raises(ValueError, match="resident_kv_memory must be >= 0"):
        Engine(model, NumberTokenizer(), resident_kv_memory=-1)


def test_resident_kv_moves_the_last_slot_into_a_freed_one_grows_keeping_contents_and_stays_when_idle():
    from genforge.serve.resident import ResidentKV

    config = tiny_model().config
    cache = PagedKVCache(config, num_blocks=8, block_size=4)
    for tensor in cache.keys + cache.values:
        tensor.copy_(torch.randn_like(tensor))
    resident = ResidentKV(config, memory_limit=1 << 20)
    owners = ["a", "b", "c"]
    tables = {"a": [5], "b": [2, 7], "c": [1, 3, 6]}
    counts = {"a": 3, "b": 6, "c": 10}
    for name in owners:
        resident.admit(name, cache, tables[name], counts[name])
    assert resident.num_slots == 4 and resident.capacity == 16  # powers of two

    def expected(name, layer):
        rows = cache.keys[layer].view(8, 4, config.num_kv_heads, config.head_dim)[tables[name]]
        return rows.flatten(0, 1)[: counts[name]].transpose(0, 1)

    resident.release("a")
    assert resident.slot_of == {"c": 0, "b": 1} and resident.lengths == [10, 6]
    resident.reserve(5, 40)  # grows both ways
    assert resident.num_slots == 8 and resident.capacity == 64
    for name in ("b", "c"):
        slot = resident.slot_of[name]
        for layer in range(config.num_layers):
            assert torch.equal(resident.keys[layer][slot, :, : counts[name]], expected(name, layer))
    assert not resident.fits(64, 64)
    with pytest.raises(ValueError, match="exceed"):
        resident.reserve(64, 64)
    with pytest.raises(ValueError, match="already has a resident slot"):
        resident.admit("b", cache, tables["b"], 6)
    resident.release("b")
    resident.release("c")
    resident.release("unknown")  # releasing what holds no slot is a no-op
    assert not resident.owners and not resident.slot_of
    assert resident.num_slots == 8 and resident.capacity == 64  # kept for the next sequences
    resident.admit("c", cache, tables["c"], counts["c"])
    assert resident.slot_of == {"c": 0}
    for layer in range(config.num_layers):
        assert torch.equal(resident.keys[layer][0, :, : counts["c"]], expected("c", layer))
    resident.clear()
    assert resident.memory == 0 and resident.num_slots == 0


def test_nan_logits_fail_the_plain_greedy_request_with_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    engine = Engine(model, NumberTokenizer())
    engine.add_request(Request("x", [1, 2, 3], greedy(5)))
    out = engine.step()[0]
    assert out.finish_reason == "error" and "NaN" in out.error
    assert engine.stats().kv_blocks_used == 0 and not engine.resident.slot_of


def watch_runs(engine: Engine) -> list:
    """Record the attention runs (`row_runs`) of every resident view the engine makes."""
    seen = []
    original = engine.resident.batch

    def watched(*args, **kwargs):
        view = original(*args, **kwargs)
        seen.append(view.row_runs)
        return view

    engine.resident.batch = watched
    return seen


def test_resident_attention_runs_cut_around_very_long_rows_and_stay_exact():
    model = tiny_model()
    engine = Engine(model, NumberTokenizer(), block_size=8)
    # On a model this small one more attention call costs more than reading every row's keys
    # (that is the right call: it never cuts); a cost of 100 tokens shows the cutting itself.
    engine.resident.run_cost = 100
    short = [[7 + i, 8, 9] for i in range(20)]
    long = [list(range(10 + i, 210 + i)) for i in range(6)]
    prompts = [p for i in range(6) for p in (*short[2 * i : 2 * i + 2], long[i])]  # short, short, long, ...
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), p, greedy(6)))
    seen = watch_runs(engine)
    moved = []
    original = engine.resident.reorder_by_length
    engine.resident.reorder_by_length = lambda: moved.append(original()) or moved[-1]
    results = run_to_end(engine)
    assert any(moved)  # the long rows were moved next to each other, longest first...
    decode_runs = [runs for runs in seen if runs is not None]
    # ...so the twelve 3-token rows stop reading 200 positions each: one run for the long rows.
    assert any(
        len(runs) == 2 and runs[0][0] == slice(0, 6) and runs[0][1] > 200 and runs[1][1] < 20 for runs in decode_runs
    )
    for i, p in enumerate(prompts):
        assert results[str(i)]["tokens"] == reference(model, p, greedy(6)).token_ids, i
    # Rows of similar length stay in one run, and nothing moves.
    engine = Engine(model, NumberTokenizer(), block_size=8)
    engine.resident.run_cost = 100
    for i, p in enumerate(short):
        engine.add_request(Request(str(i), p, greedy(3)))
    seen = watch_runs(engine)
    run_to_end(engine)
    assert seen and all(runs is None for runs in seen)


def test_cheapest_runs_is_the_best_cut_and_reordering_keeps_every_row():
    from genforge.serve.resident import ResidentKV
    from genforge.serve.runs import cheapest_runs

    rng = random.Random(0)
    for _ in range(200):
        widths = [rng.choice([1, 5, 40, 41, 200]) for _ in range(rng.randint(1, 8))]
        run_cost = rng.choice([0, 3, 30, 500])
        cost, runs = cheapest_runs(widths, run_cost)
        assert runs[0][0] == 0 and runs[-1][1] == len(widths)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert cost == sum(run_cost + (b - a) * max(widths[a:b]) for a, b in runs)
        # Brute force over every set of cut points.
        brute = min(
            sum(run_cost + (b - a) * max(widths[a:b]) for a, b in zip((0, *cuts), (*cuts, len(widths))))
            for r in range(len(widths))
            for cuts in itertools.combinations(range(1, len(widths)), r)
        )
        assert cost == brute
    # Reordering moves each row's keys and values with it.
    config = tiny_model().config
    cache = PagedKVCache(config, num_blocks=16, block_size=4)
    for pool in cache.keys + cache.values:
        pool.copy_(torch.randn(pool.shape))
    resident = ResidentKV(config, memory_limit=1 << 22)
    resident.run_cost = 20  # one run costs 128 tokens as they lie, 100 sorted: the move pays
    tables = {"a": [0], "b": [1, 2, 3, 4, 5, 6], "c": [7], "d": [8, 9, 10, 11, 12, 13, 14]}
    counts = {"a": 3, "b": 22, "c": 2, "d": 27}
    for name in "abcd":
        resident.admit(name, cache, tables[name], counts[name])
    assert resident.reorder_by_length()
    assert resident.owners == ["d", "b", "a", "c"] and resident.lengths == [27, 22, 3, 2]
    assert resident.slot_of == {"d": 0, "b": 1, "a": 2, "c": 3}
    assert not resident.reorder_by_length()  # nothing changed since
    for name in "abcd":
        slot, n = resident.slot_of[name], counts[name]
        used = torch.tensor(tables[name])
        for layer in range(config.num_layers):
            blocks = cache.keys[layer].view(16, 4, config.num_kv_heads, config.head_dim)
            expected = blocks.index_select(0, used).flatten(0, 1)[:n].transpose(0, 1)
            assert torch.equal(resident.keys[layer][slot, :, :n], expected)
