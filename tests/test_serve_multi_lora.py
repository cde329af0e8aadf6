"""Many LoRA adapters over one base in the same batch (`finetune.multi_lora`), through the engine
and the OpenAI-compatible server.

The references: a `LoraLinear` holding one adapter (checked against PEFT in test_finetune_lora.py)
for the layer, and the model with that adapter merged into its weights (`merge_and_unload`), run
alone by the simple generator, for the model, the engine and the server.
"""

from __future__ import annotations

import asyncio
import copy

import httpx2
import openai
import pytest
import torch
from finetune_shared import randomize
from live_server import LiveServer

from genforge.checkpoint import save_model
from genforge.finetune.lora import (
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from genforge.finetune.multi_lora import MultiLora, MultiLoraLinear, UnknownAdapterError
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.inference import PackedLinear, pack_for_cpu_inference
from genforge.serve.api import app_from_directories, create_app
from genforge.serve.cli import _lora_dirs
from genforge.serve.engine import AsyncEngine, Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")

# Three adapters of different ranks and targets: "math" leaves k and the MLP alone, "code" the
# attention's q, k, v, and "chat" also adapts the LM head (untied here), with per-module ranks.
ADAPTERS = {
    "math": LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True),
    "code": LoraConfig(
        target_modules=["o_proj", "gate_proj", "down_proj"], r=8, lora_alpha=16, rank_pattern={"down_proj": 2}
    ),
    "chat": LoraConfig(
        target_modules=["k_proj", "up_proj", "lm_head"], r=2, lora_alpha=4, alpha_pattern={"lm_head": 8}
    ),
}
MODEL = "tiny"


@pytest.fixture(scope="module")
def adapter_dirs(bpe_model, tmp_path_factory):
    """name -> a PEFT adapter directory over `bpe_model`, with random non-zero A and B."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        model = apply_lora(copy.deepcopy(bpe_model), config)
        randomize(model.named_parameters(), seed=seed)
        dirs[name] = save_adapter(model, root / name)
    return dirs


@pytest.fixture(scope="module")
def merged(bpe_model, adapter_dirs):
    """name -> the base with that adapter merged in (None -> the base itself)."""
    models = {None: bpe_model}
    for name, directory in adapter_dirs.items():
        models[name] = merge_and_unload(load_adapter(copy.deepcopy(bpe_model), directory)).eval()
    return models


def serving(base, adapter_dirs) -> tuple:
    """A copy of the base serving every adapter, and its MultiLora."""
    model = copy.deepcopy(base).eval()
    adapters = MultiLora(model)
    for name, directory in adapter_dirs.items():
        adapters.load(name, directory)
    return model, adapters


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n)


def greedy_text(model, tokenizer, ids: list[int], n: int) -> str:
    """The text the server answers for `n` greedy tokens of `model` alone (special tokens skipped)."""
    out = generate(model, [ids], greedy(n), tokenizer=tokenizer, eos_token_ids=[])[0]
    return tokenizer.decode(out.token_ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------- the layer
def test_each_row_of_a_mixed_batch_gets_its_own_lora_exactly(bpe_model, adapter_dirs):
    model, adapters = serving(bpe_model, adapter_dirs)
    rows = ["math", None, "code", "chat", "math", None, "chat"]
    torch.manual_seed(3)
    one_adapter = {name: load_adapter(copy.deepcopy(bpe_model), d).eval() for name, d in adapter_dirs.items()}
    for layer_name in ("blocks.0.attn.qkv", "blocks.1.mlp.gate_up", "blocks.1.mlp.down", "lm_head"):
        layer = model.get_submodule(layer_name)
        assert isinstance(layer, MultiLoraLinear)
        x = torch.randn(len(rows), 5, layer.in_features)
        with torch.no_grad(), adapters.rows(rows):
            out = layer(x)
        for name in ("math", "code", "chat", None):
            members = [i for i, row in enumerate(rows) if row == name]
            reference = one_adapter[name].get_submodule(layer_name) if name else layer.base_layer
            if name is not None and not isinstance(reference, LoraLinear):  # this adapter leaves the layer alone
                reference = layer.base_layer
            with torch.no_grad():
                expected = reference(x[members])
            assert torch.equal(out[members], expected), (layer_name, name)
    # Outside a rows context every row is the base's.
    with torch.no_grad():
        assert torch.equal(model.lm_head(x), model.lm_head.base_layer(x))


def test_a_mixed_batch_equals_each_row_on_its_merged_model(bpe_model, adapter_dirs, merged):
    model, adapters = serving(bpe_model, adapter_dirs)
    rows = ["chat", "math", None, "code", "code"]
    torch.manual_seed(4)
    ids = torch.randint(0, 400, (len(rows), 9))
    with torch.no_grad():
        with adapters.rows(rows):
            logits = model(ids).logits
        for i, name in enumerate(rows):
            alone = merged[name](ids[i : i + 1]).logits[0]
            assert (logits[i] - alone).abs().max() < 1e-5, name
            if name is not None:  # and the adapter did change this row
                assert (logits[i] - merged[None](ids[i : i + 1]).logits[0]).abs().max() > 1e-3


def test_unloading_the_last_adapter_of_a_layer_puts_the_base_layer_back(bpe_model, adapter_dirs):
    model, adapters = serving(bpe_model, adapter_dirs)
    base_head = model.lm_head.base_layer
    adapters.unload("chat")  # the only adapter on lm_head and on up
    assert model.lm_head is base_head
    assert isinstance(model.blocks[0].attn.qkv, MultiLoraLinear)  # math still adapts q and v
    assert adapters.names == ("math", "code")
    reloaded = adapters.load("chat", adapter_dirs["chat"])
    assert reloaded == 4  # ids are never reused: a reloaded adapter's cached blocks are not its old ones
    for name in ("math", "code", "chat"):
        adapters.unload(name)
    assert not any(isinstance(m, MultiLoraLinear) for m in model.modules())


def test_packed_base_layers_serve_adapters_too(bpe_model, adapter_dirs, merged):
    model = copy.deepcopy(bpe_model).eval()
    adapters = MultiLora(model)
    pack_for_cpu_inference(model)
    with pytest.raises(LoraError, match="packed for CPU inference; build MultiLora on the model as loaded"):
        MultiLora(pack_for_cpu_inference(copy.deepcopy(bpe_model)))
    adapters.load("code", adapter_dirs["code"])
    assert isinstance(model.blocks[0].attn.o.base_layer, PackedLinear)
    ids = torch.tensor([[5, 17, 3, 44, 90], [7, 7, 21, 80, 2]])
    with torch.no_grad(), adapters.rows(["code", None]):
        logits = model(ids).logits
    with torch.no_grad():
        assert (logits[0] - merged["code"](ids[:1]).logits[0]).abs().max() < 1e-5
        assert (logits[1] - merged[None](ids[1:]).logits[0]).abs().max() < 1e-5


def test_refusals_say_what_was_wrong(bpe_model, adapter_dirs, tmp_path):
    model, adapters = serving(bpe_model, adapter_dirs)
    with pytest.raises(
        UnknownAdapterError, match="no LoRA adapter named 'nope' is loaded; loaded adapters: math, code, chat"
    ):
        with adapters.rows(["math", "nope"]):
            pass
    with pytest.raises(LoraError, match="already loaded"):
        adapters.load("math", adapter_dirs["code"])
    with pytest.raises(LoraError, match="without ':'"):
        adapters.load("a:b", adapter_dirs["code"])
    with pytest.raises(RuntimeError, match="got 1 rows but the adapter rows set with MultiLora.rows name 2"):
        with torch.no_grad(), adapters.rows(["math", None]):
            model(torch.tensor([[1, 2, 3]]))
    dora = apply_lora(copy.deepcopy(bpe_model), LoraConfig(target_modules=["q_proj"], r=2, use_dora=True))
    save_adapter(dora, tmp_path / "dora")
    with pytest.raises(LoraError, match="DoRA adapter, which multi-adapter serving does not take"):
        adapters.load("dora", tmp_path / "dora")
    assert adapters.names == ("math", "code", "chat")  # a refused adapter changes nothing
    with pytest.raises(LoraError, match="no adapter_config.json"):
        adapters.load("missing", tmp_path / "nowhere")


# ------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("resident_kv_memory", [None, 0])  # resident rows, and gathered blocks
def test_a_mixed_batch_in_the_engine_equals_each_request_alone_on_its_merged_model(
    bpe_model, adapter_dirs, merged, resident_kv_memory
):
    model, adapters = serving(bpe_model, adapter_dirs)
    engine = Engine(model, block_size=4, adapters=adapters, resident_kv_memory=resident_kv_memory)
    torch.manual_seed(5)
    shared = torch.randint(0, 400, (12,)).tolist()  # a prompt every adapter starts with
    names = [None, "math", "code", "chat"]
    requests = []
    for i in range(12):
        name = names[i % 4]
        prompt = shared + torch.randint(0, 400, (1 + i % 5,)).tolist() if i < 8 else shared
        requests.append((f"r{i}", name, prompt, 4 + i % 6))
    for request_id, name, prompt, new in requests:
        engine.add_request(Request(request_id, prompt, greedy(new), adapter=name, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    for request_id, name, prompt, new in requests:
        expected = generate(merged[name], [prompt], greedy(new), eos_token_ids=[])[0].token_ids
        assert tokens[request_id] == expected, (request_id, name)
    assert engine.stats().kv_blocks_used == 0


def test_prefix_caching_shares_blocks_within_an_adapter_only(bpe_model, adapter_dirs):
    model, adapters = serving(bpe_model, adapter_dirs)
    engine = Engine(model, block_size=4, adapters=adapters)
    prompt = list(range(10, 23))  # three full blocks before the last token

    def run(request_id, adapter):
        before = engine.stats().prefix_cache_hits
        engine.add_request(Request(request_id, prompt, greedy(2), adapter=adapter))
        while engine.has_unfinished():
            engine.step()
        return engine.stats().prefix_cache_hits - before

    assert run("base", None) == 0
    assert run("math", "math") == 0  # the base's blocks hold the base's keys: not for math
    assert run("code", "code") == 0
    assert run("math again", "math") == 3
    assert run("base again", None) == 3


def test_an_adapter_unloaded_while_in_use_finishes_its_requests_then_goes(bpe_model, adapter_dirs, merged):
    model, adapters = serving(bpe_model, adapter_dirs)
    engine = Engine(model, block_size=4, adapters=adapters)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine.add_request(Request("running", prompt, greedy(8), adapter="chat", ignore_eos=True))
    tokens = list(engine.step()[0].token_ids)
    engine.unload_adapter("chat")
    assert adapters.names == ("math", "code")
    with pytest.raises(UnknownAdapterError, match="loaded adapters: math, code"):
        engine.add_request(Request("late", prompt, greedy(2), adapter="chat"))
    assert isinstance(model.lm_head, MultiLoraLinear)  # still serving the running request
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
    assert tokens == generate(merged["chat"], [prompt], greedy(8), eos_token_ids=[])[0].token_ids
    assert not isinstance(model.lm_head, MultiLoraLinear)  # freed once its last request ended
    engine.load_adapter("chat", adapter_dirs["chat"])  # and loads again under the same name
    with pytest.raises(LoraError, match="already loaded"):
        engine.load_adapter("chat", adapter_dirs["chat"])
    with pytest.raises(UnknownAdapterError, match="loaded adapters: none"):
        Engine(copy.deepcopy(bpe_model)).add_request(Request("x", prompt, greedy(2), adapter="chat"))


# ------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(bpe_model, bpe_tokenizer, adapter_dirs):
    model = copy.deepcopy(bpe_model).eval()
    adapters = MultiLora(model)
    for name in ("math", "code"):  # chat is loaded at run time
        adapters.load(name, adapter_dirs[name])
    engine = AsyncEngine({MODEL: Engine(model, bpe_tokenizer, block_size=8, adapters=adapters)})
    app = create_app(engine, tokenizers={MODEL: bpe_tokenizer}, api_keys=["secret"])
    with LiveServer(app) as live:
        yield live


def test_the_openai_client_lists_adapters_and_completes_with_each(server, bpe_tokenizer, merged):
    client = server.client("secret")
    assert [m.id for m in client.models.list().data] == [MODEL, f"{MODEL}:math", f"{MODEL}:code"]
    card = client.models.retrieve(f"{MODEL}:math")
    assert card.id == f"{MODEL}:math" and card.model_extra["parent"] == MODEL
    prompt = "The json module"
    ids = bpe_tokenizer.encode(prompt, add_special_tokens=True)

    def expected(name):
        return greedy_text(merged[name], bpe_tokenizer, ids, 8)

    picks = {
        "math": dict(model=f"{MODEL}:math"),
        "code": dict(model="code"),  # the adapter's own name
        None: dict(model=MODEL),
    }
    for name, pick in picks.items():
        text = client.completions.create(
            prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **pick
        )
        assert text.choices[0].text == expected(name), name
    by_field = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "lora": "math"}
    )
    assert by_field.choices[0].text == expected("math")


def test_concurrent_requests_on_different_adapters_each_match_their_merged_model(server, bpe_tokenizer, merged):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        picks = [MODEL, f"{MODEL}:math", f"{MODEL}:code", f"{MODEL}:math", MODEL, f"{MODEL}:code"]
        prompts = [[7 + i, 40 + 3 * i, 11, 90 + i, 5] for i in range(len(picks))]
        answers = await asyncio.gather(
            *(
                client.completions.create(
                    model=pick, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
                )
                for pick, prompt in zip(picks, prompts)
            )
        )
        return picks, prompts, answers

    picks, prompts, answers = asyncio.run(main())
    for pick, prompt, answer in zip(picks, prompts, answers):
        name = pick.partition(":")[2] or None
        assert answer.choices[0].text == greedy_text(merged[name], bpe_tokenizer, prompt, 6), pick


def test_an_unknown_adapter_is_404_listing_the_served_ones(server):
    client = server.client("secret")
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model=f"{MODEL}:nope", prompt="x", max_tokens=2)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert f"served: {MODEL}, {MODEL}:math, {MODEL}:code" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2, extra_body={"lora": "math"})
    with pytest.raises(openai.BadRequestError, match="names the adapter 'math' but lora names 'code'"):
        client.completions.create(model=f"{MODEL}:math", prompt="x", max_tokens=2, extra_body={"lora": "code"})


def test_loading_at_run_time_needs_the_api_key_and_serves_the_adapter(server, bpe_tokenizer, merged, adapter_dirs):
    load = {"lora_name": "chat", "lora_path": str(adapter_dirs["chat"])}
    assert httpx2.post(server.url + "/v1/load_lora_adapter", json=load).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx2.post(server.url + "/v1/load_lora_adapter", json=load, headers=wrong).status_code == 401
    key = {"Authorization": "Bearer secret"}
    client = server.client("secret")
    bad_path = httpx2.post(server.url + "/v1/load_lora_adapter", json={**load, "lora_path": "/nowhere"}, headers=key)
    assert bad_path.status_code == 400 and "no adapter_config.json" in bad_path.json()["error"]["message"]
    answer = httpx2.post(server.url + "/v1/load_lora_adapter", json=load, headers=key)
    assert answer.status_code == 200 and answer.json()["id"] == f"{MODEL}:chat"
    again = httpx2.post(server.url + "/v1/load_lora_adapter", json=load, headers=key)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    try:
        assert f"{MODEL}:chat" in [m.id for m in client.models.list().data]
        ids = [12, 50, 7, 301]
        text = client.completions.create(
            model=f"{MODEL}:chat", prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert text.choices[0].text == greedy_text(merged["chat"], bpe_tokenizer, ids, 5)
    finally:
        unload = {"lora_name": "chat"}
        assert httpx2.post(server.url + "/v1/unload_lora_adapter", json=unload).status_code == 401
        assert httpx2.post(server.url + "/v1/unload_lora_adapter", json=unload, headers=key).status_code == 200
    assert f"{MODEL}:chat" not in [m.id for m in client.models.list().data]
    gone = httpx2.post(server.url + "/v1/unload_lora_adapter", json=unload, headers=key)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------------- start-up
def test_serve_loads_lora_directories_at_start_up(bpe_model, bpe_tokenizer, adapter_dirs, tmp_path):
    model_dir = save_model(bpe_model, tmp_path / "model", tokenizer=bpe_tokenizer)
    loras = _lora_dirs([f"math={adapter_dirs['math']}", f"{MODEL}:code={adapter_dirs['code']}"], [MODEL])
    assert loras == {MODEL: {"math": str(adapter_dirs["math"]), "code": str(adapter_dirs["code"])}}
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        _lora_dirs([f"x={tmp_path}"], [MODEL])
    with pytest.raises(ValueError, match="several models are served"):
        _lora_dirs([f"math={adapter_dirs['math']}"], [MODEL, "other"])
    with pytest.raises(ValueError, match="no served model is named 'other'"):
        _lora_dirs([f"other:math={adapter_dirs['math']}"], [MODEL])
    app = app_from_directories({MODEL: model_dir}, loras=loras)
    state = app.state.server
    assert state.all_models == [MODEL, f"{MODEL}:math", f"{MODEL}:code"]
    assert state.generation_target("math") == (MODEL, "math")
    served = state.engine.engine(MODEL).model
    assert isinstance(served.blocks[0].attn.qkv.base_layer, PackedLinear)  # packed under the adapters
