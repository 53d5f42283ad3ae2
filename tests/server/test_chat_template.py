"""Chat templates render exactly as transformers' `apply_chat_template` renders them."""
from __future__ import annotations

from typing import Any

import jinja2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rillet.server.chat_template import (DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError,
                                         select_chat_template)
from tests.fixtures.tiny_models import TinyModel

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief. Ünïcödé & <tags> stay as they are."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4", "tool_calls": None},
    {"role": "user", "content": "And 3 + 3?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]

# Exercises what real templates use: whitespace control with trim/lstrip blocks, namespace,
# loop controls, tojson with indent and non-ASCII, strftime_now, special tokens, tools, dict().
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system=none, turns=0) %}
{% if tools %}
    Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <|{{ message['role'] }}|>
    {{ message['content'] | trim }}{{ eos_token }}
    {% if 'tool_calls' in message %}HAS TOOL CALLS{% endif %}
{% endfor %}
System={{ ns.system | tojson }} turns={{ ns.turns }} year={{ strftime_now('%Y') }}
{{ dict(a=1) | tojson }}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

STRICT_TEMPLATE = """{% for message in messages %}
{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}
{{ message['role'] }}: {{ message['content'] }}
{% endfor %}"""


@pytest.fixture(scope="module")
def hf(tiny_models: dict[str, TinyModel]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_models["qwen3"].hf_dir)


def ours(hf: PreTrainedTokenizerBase, source: str) -> ChatTemplate:
    return ChatTemplate(source, {"bos_token": hf.bos_token, "eos_token": hf.eos_token})


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_matches(hf: PreTrainedTokenizerBase, add_generation_prompt: bool) -> None:
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours(hf, hf.chat_template).render(MESSAGES, add_generation_prompt) == expected


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_rich_template_matches(hf: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None) -> None:
    expected = hf.apply_chat_template(MESSAGES, chat_template=RICH_TEMPLATE, tools=tools, tokenize=False,
                                      add_generation_prompt=True)
    assert ours(hf, RICH_TEMPLATE).render(MESSAGES, True, tools=tools) == expected
    assert "Ünïcödé" in expected and "<tags>" in expected


def test_raise_exception_is_a_request_error(hf: PreTrainedTokenizerBase) -> None:
    with pytest.raises(jinja2.exceptions.TemplateError, match="Only user and assistant"):
        hf.apply_chat_template(MESSAGES, chat_template=STRICT_TEMPLATE, tokenize=False)
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        ours(hf, STRICT_TEMPLATE).render(MESSAGES)
    fine = MESSAGES[1:]
    assert ours(hf, STRICT_TEMPLATE).render(fine) == hf.apply_chat_template(
        fine, chat_template=STRICT_TEMPLATE, tokenize=False)


def test_the_sandbox_holds(hf: PreTrainedTokenizerBase) -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ours(hf, escape).render(MESSAGES)
    with pytest.raises(ChatTemplateError):
        ours(hf, "{% set ns = namespace() %}{% set ns._x = 1 %}").render(MESSAGES)


def test_extra_variables_cannot_replace_the_messages(hf: PreTrainedTokenizerBase) -> None:
    template = ours(hf, "{{ messages | length }} {{ flavour }}")
    assert template.render(MESSAGES, variables={"messages": [], "flavour": "mint"}) == "4 mint"


def test_default_template_for_base_models() -> None:
    template, origin = select_chat_template(None, {"bos_token": "<s>"})
    assert origin.startswith("the default")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    assert template.render(messages) == "<s>System: You are terse.\n\nUser: Hello!\n\nAssistant:"
    assert template.render(messages, add_generation_prompt=False) == "<s>System: You are terse.\n\nUser: Hello!\n\n"
    assert ChatTemplate(DEFAULT_CHAT_TEMPLATE, {}).render(messages[1:]) == "User: Hello!\n\nAssistant:"


def test_selection_order() -> None:
    assert select_chat_template("{{ 'model' }}", {}, override="{{ 'file' }}")[0].render([{"role": "u"}]) == "file"
    assert select_chat_template("{{ 'model' }}", {})[0].render([{"role": "u"}]) == "model"
    broken, origin = select_chat_template("{% if %}", {})
    assert origin.startswith("the default")
    with pytest.raises(ValueError, match="does not compile"):
        select_chat_template(None, {}, override="{% for %}")


def test_empty_conversation_is_refused(hf: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ChatTemplateError):
        ours(hf, hf.chat_template).render([])
