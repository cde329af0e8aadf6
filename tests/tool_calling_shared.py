"""Tool-calling fixtures shared by test_tool_calls.py and test_serve_tools.py: chat templates in
the Hermes/Qwen and Llama 3 styles (written for these tests), a byte-level BPE tokenizer with
ChatML-style special tokens, a tiny random Llama over it, and tools with small schemas."""

from __future__ import annotations

import json

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from genforge.checkpoint import save_model
from genforge.config import Config
from genforge.model import Transformer
from genforge.tokenizer import Tokenizer

# Hermes/Qwen style: tools listed in the system turn, calls between <tool_call> tags, results in
# <tool_response> within a user turn.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You can call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one by writing <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% if not loop.last %}
{% endif %}{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3 style: a JSON object per call with its arguments under "parameters", calls joined by "; ".
LLAMA3_TEMPLATE = """\
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Answer with a function call as JSON: {"name": function name, "parameters": an object of its arguments}.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|eot_id|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": \
{{ call.function.arguments | tojson }}}{% if not loop.last %}; {% endif %}{% endfor %}<|eot_id|>
{%- else %}<|start_header_id|>{{ 'ipython' if message.role == 'tool' else message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# No tools anywhere: the server must refuse tools for a model with this template.
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIALS = ["<|im_end|>", "<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
LIGHTS = {
    "type": "function",
    "function": {
        "name": "set_lights",
        "description": "Switch lights in rooms.",
        "parameters": {
            "type": "object",
            "properties": {
                "on": {"type": "boolean"},
                "rooms": {"type": "array", "items": {"enum": ["hall", "kitchen"]}, "maxItems": 2},
                "where": {"$ref": "#/$defs/Place"},
            },
            "required": ["on", "where"],
            "additionalProperties": False,
            "$defs": {
                "Place": {
                    "type": "object",
                    "properties": {"floor": {"type": "integer", "minimum": 0, "maximum": 3}},
                    "required": ["floor"],
                    "additionalProperties": False,
                }
            },
        },
    },
}
TOOLS = [WEATHER, ADD, LIGHTS]


def _corpus() -> str:
    text = open(json.__file__, encoding="utf-8").read()[:4000]
    calls = " ".join(json.dumps({"name": t["function"]["name"], "arguments": {"a": 1}}) for t in TOOLS)
    return (
        text + calls + ' {"city": "Paris", "unit": "celsius"} 0123456789 [] {} "" : , ; true false null hall kitchen '
    )


def tool_tokenizer(tag_tokens: bool = True, template: str = HERMES_TEMPLATE) -> Tokenizer:
    """Byte-level BPE over a small corpus (printable ASCII only, so a random model writes readable
    text), ChatML and Llama 3 special tokens, and with ``tag_tokens`` the call tags as added
    (non-special) tokens, as Qwen2.5 has them."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False)
    backend.train_from_iterator([_corpus()], trainer)
    if tag_tokens:
        backend.add_tokens(
            [AddedToken(tag, special=False, normalized=False) for tag in ("<tool_call>", "</tool_call>")]
        )
    return Tokenizer(backend, {"eos_token": "<|im_end|>", "chat_template": template})


def tool_model_dir(directory, tokenizer: Tokenizer, context: int = 1024, seed: int = 0):
    """A tiny random Llama over ``tokenizer`` saved to ``directory``; its embedding table is
    padded past the vocabulary (rows the constraint must never let through)."""
    config = Config(
        family="llama",
        vocab_size=len(tokenizer) + 16,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return save_model(Transformer(config), directory, tokenizer=tokenizer)
