"""Chat messages -> prompt text, rendering Jinja chat templates as `transformers`' `apply_chat_template` does.

The environment matches transformers': sandboxed and immutable, `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text and takes `indent`,
`raise_exception(message)` and `strftime_now(format)`. Templates see `messages` (keys whose value
is None dropped), `tools`, `documents`, `add_generation_prompt`, the special tokens (`bos_token`,
`eos_token`) and any extra keyword arguments.

Models without a template (most base models) get `DEFAULT_CHAT_TEMPLATE`: a plain transcript,

    <bos>System: You are terse.

    User: Hello!

    Assistant:

so a base model continues it as the assistant. The model may go on to write the next "User:"
turn itself; send `stop: ["\\nUser:"]` to cut it there. Contents are trimmed: a reply generated
after "Assistant:" starts with a space, and sent back in the next turn it renders as the same
tokens, so the follow-up's prompt extends the earlier one token for token and reuses its KV cache.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim if message['content'] is string else '' }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class ChatTemplateError(ValueError):
    """The template rejected the conversation (or could not be rendered); a 400 for the client."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # NOTE: Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _Dict:
    """`dict(...)` without the attributes of the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes: {name!r}")


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


class ChatTemplate:
    """A compiled template plus the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        try:
            self.template = compile_template(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e}") from e
        self.source = source
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
               variables: dict[str, Any] | None = None) -> str:
        """The prompt text; raises `ChatTemplateError` when the template refuses the conversation.

        `variables` (a request's `chat_template_kwargs`) may add names or override the special
        tokens, but not replace the conversation itself.
        """
        if not messages:
            raise ChatTemplateError("messages must hold at least one message")
        cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
        extra = {k: v for k, v in (variables or {}).items() if k not in _RESERVED}
        context = {**self.special_tokens, **extra, "messages": cleaned, "tools": tools, "documents": documents,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self.template.render(context)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e


def select_chat_template(model_template: str | None, special_tokens: dict[str, str],
                         override: str | None = None) -> tuple[ChatTemplate, str]:
    """The template to serve with, and where it came from: the override, the model's, or the default."""
    if override is not None:
        return ChatTemplate(override, special_tokens), "--chat-template"
    if model_template:
        try:
            return ChatTemplate(model_template, special_tokens), "the model's"
        except ValueError as e:
            logger.warning("the model's chat template is unusable (%s); using the default", e)
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, special_tokens), "the default (plain transcript)"
