"""Chat templates: found in a checkpoint as transformers finds them, stored in the repository, rendered as
transformers renders them.

A checkpoint declares its template in ``chat_template.jinja``, ``chat_template.json``
(``{"chat_template": ...}``) or the ``chat_template`` key of ``tokenizer_config.json``, in that order of
precedence (transformers' own). ``generate`` writes the one it serves into the ``tokenizer_config.json``
of the repository's tokenizer folders, the place every transformers version reads, so that the folder
is a Hugging Face tokenizer directory with its template (what Triton's OpenAI frontend's ``--tokenizer``
takes), and into the preprocessing model's config, so that a front that sees only the server finds it.

Rendering follows ``transformers.utils.chat_template_utils``: a sandboxed Jinja environment
(``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``, the loop controls extension,
``{% generation %}`` blocks rendered as their body),
``raise_exception``, a ``tojson`` that does not escape HTML, ``strftime_now``, and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...) among the variables. Only jinja2 is needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError

JINJA_FILE = "chat_template.jinja"
JSON_FILE = "chat_template.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A template that cannot render these messages; the message is the template's own words."""


def pick_default(value: Any) -> str | None:
    """tokenizer_config's ``chat_template``: a string, or a list of ``{"name", "template"}`` of which the one
    named ``default`` is what a request without a template name gets."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                return item["template"]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_template_file(path: str | Path) -> str:
    """A template file for ``generate --chat-template``: Jinja text, or JSON holding ``chat_template``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--chat-template {path}: no such file; pass a .jinja file (or a chat_template.json)")
    if path.suffix == ".json":
        data = _read_json(path)
        template = pick_default(data.get("chat_template") if isinstance(data, dict) else data)
        if template is None:
            raise CheckpointError(f"--chat-template {path}: the JSON holds no \"chat_template\" string")
    else:
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"--chat-template {path}: cannot read it ({e})") from None
    check_template(template, str(path))
    return template


def read_chat_template(root: Path, tokenizer_config: Mapping[str, Any] | None = None) -> Any:
    """The checkpoint's chat template as transformers would load it (str, list of named ones, or None)."""
    if (root / JINJA_FILE).is_file():
        try:
            return (root / JINJA_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {root / JINJA_FILE}: {e}") from None
    if (root / JSON_FILE).is_file():
        data = _read_json(root / JSON_FILE)
        if isinstance(data, dict) and data.get("chat_template"):
            return data["chat_template"]
    if tokenizer_config is None and (root / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(root / "tokenizer_config.json")
    value = (tokenizer_config or {}).get("chat_template") if isinstance(tokenizer_config, Mapping) else None
    return value or None


def special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """``bos_token`` & co. as strings (tokenizer_config.json may spell them as AddedToken dicts)."""
    out = {}
    for name in SPECIAL_TOKENS:
        value = tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant tokens for training):
    renders its body, as transformers does when it is not asked for the mask."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def check_template(template: str, where: str) -> None:
    try:
        compile_template(template)
    except ChatTemplateError as e:
        raise CheckpointError(f"{where}: {e}") from None


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                tokens: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """The prompt text of ``messages``; ChatTemplateError with the template's words when it refuses them."""
    compiled = compile_template(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **{**dict(tokens or {}), **kwargs})
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(str(e) or type(e).__name__) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None
