"""The agent loop end to end on a tiny random model under tool_choice="required": in process
(LocalChatModel) and served (genforge serve through the openai client). Constrained decoding
must make every call valid against its tool's schema; the run must stay within its budgets
and leave a complete trace that replays.

Needs tool calling in genforge (`genforge.generate.tool_calls`); skipped without it.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import torch

pytest.importorskip(
    "genforge.generate.tool_calls",
    reason="tool calling (genforge.generate.tool_calls, the server's tools support) is not in this checkout yet",
)

from genforge.agents import Agent, Tool, read_trace, replay
from genforge.chat_models import EndpointChatModel, LocalChatModel

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-agent"
# A chat template in the Hermes/Qwen manner, written for this test: tools listed in the system
# turn, calls inside <tool_call> tags, results in <tool_response> blocks.
TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}Tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call a tool as <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}{% for call in message.tool_calls or [] %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def move(direction: Literal["left", "right", "up", "down"], steps: Literal[1, 2, 3]) -> str:
    """Move on the grid.

    Args:
        direction: where to.
        steps: how far.
    """
    return f"moved {direction} by {steps}"


def paint(color: Literal["red", "blue"], fill: bool) -> str:
    """Paint the current cell.

    Args:
        color: the paint.
        fill: fill the cell, or only its border.
    """
    return f"painted {color}" + (" (filled)" if fill else "")


TOOLS = [Tool.from_function(move), Tool.from_function(paint)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama over a byte-level BPE tokenizer with ChatML special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    from genforge.checkpoint import load_model, save_model
    from genforge.config import Config
    from genforge.model import Transformer
    from genforge.tokenizer import Tokenizer

    specials = ["<|im_end|>", "<|im_start|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[AddedToken(s, special=True) for s in specials],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = (
        json.dumps([t.spec() for t in TOOLS]) + TEMPLATE + ' {"name": "move", "arguments": {"steps": 2}} true false'
    )
    backend.train_from_iterator([corpus * 3], trainer)
    tokenizer = Tokenizer(backend, {"eos_token": "<|im_end|>", "chat_template": TEMPLATE})
    config = Config(
        family="llama",
        vocab_size=512,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    directory = save_model(Transformer(config), tmp_path_factory.mktemp("agent") / "model", tokenizer=tokenizer)
    return load_model(directory), Tokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def served(tiny):
    from live_server import LiveServer

    from genforge.serve.api import create_app
    from genforge.serve.engine import AsyncEngine, Engine

    model, tokenizer = tiny
    engine = AsyncEngine({MODEL: Engine(model, tokenizer, block_size=16, max_num_seqs=4, max_num_batched_tokens=2048)})
    with LiveServer(create_app(engine, tokenizers={MODEL: tokenizer})) as live:
        yield live


def check_run(model, tmp_path, max_steps=3, max_tokens=160):
    trace = tmp_path / "trace.jsonl"
    agent = Agent(
        model,
        TOOLS,
        system_prompt="Use the tools.",
        tool_choice="required",
        final_answer_tool=False,
        max_steps=max_steps,
        max_tokens=max_tokens,
        max_tokens_per_step=64,
        seed=0,
    )
    result = agent.run("Paint the cell two steps to the left.", trace_path=trace)
    schemas = {t.name: t.parameters for t in TOOLS}
    replies = [r for r in result.trace if r["type"] == "reply"]
    # Budgets: steps, tokens in all, and each reply within what its request allowed.
    assert 1 <= len(result.steps) <= max_steps and result.completion_tokens <= max_tokens
    assert result.stop_reason in ("max_steps", "max_tokens")
    assert all(0 < r["completion_tokens"] <= r["max_tokens"] for r in replies)
    # Under "required" every reply cut by nothing but the model calls a tool, and every call is valid.
    assert all(r["message"].get("tool_calls") or r["finish_reason"] == "length" for r in replies)
    assert result.tool_calls
    for call in result.tool_calls:
        assert call.name in schemas
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        assert not call.result.is_error, call.result.content
    # The trace is complete and replays to the same tool results.
    records = read_trace(trace)
    assert records[0]["type"] == "start" and records[-1]["type"] == "end"
    assert [r["message"] for r in records if "message" in r] == result.messages
    report = replay(trace, TOOLS)
    assert report.matches, report.differences
    return result


@pytest.mark.parametrize("max_tokens", [160, 80])
def test_agent_in_process_under_required_tool_choice(tiny, tmp_path, max_tokens):
    model, tokenizer = tiny
    chat_model = LocalChatModel(model=model, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    check_run(chat_model, tmp_path, max_tokens=max_tokens)


def test_agent_against_genforge_serve_under_required_tool_choice(served, tmp_path):
    result = check_run(EndpointChatModel(MODEL, client=served.client()), tmp_path)
    # The server reports usage, so the budget counted real tokens, not estimates.
    assert not any(r.get("tokens_estimated") for r in result.trace if r["type"] == "reply")
