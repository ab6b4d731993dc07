"""Tokenizers and chat templates for ``jds serve``.

* ``ByteTokenizer``: UTF-8 bytes as token ids (jds's byte-level presets and runs, vocab 256).
* ``HFTokenizer``: a Hugging Face model folder's own ``tokenizer.json``, read with the
  ``tokenizers`` library (the Rust tokenizer ``transformers``' fast tokenizers wrap, so the
  ids are the same without importing ``transformers``); its special tokens and chat template
  from ``tokenizer_config.json`` (or ``chat_template.jinja`` / ``chat_template.json``, where
  newer ``transformers`` write it), its end-of-sequence ids from ``generation_config.json``.
  A folder with only a slow (SentencePiece) tokenizer falls back to ``transformers``'
  ``AutoTokenizer`` when that is installed.

Chat templates are rendered as ``transformers.apply_chat_template`` renders them: Jinja2's
sandboxed environment with ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols``
extension, ``tojson``, ``raise_exception`` and ``strftime_now``, the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` (and the other special
tokens); the text is then encoded without adding special tokens (the template writes them).
A model with no template of its own uses ``DEFAULT_CHAT_TEMPLATE`` (one ``role: content``
line per message, then ``assistant:``), or a template given with ``jds serve
--chat-template FILE``.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import json
from pathlib import Path
from typing import Any

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


class TemplateError(ValueError):
    """A chat template refused the messages (its ``raise_exception``) or failed to render."""


class ByteTokenizer:
    """UTF-8 bytes as token ids (the byte-level presets, vocab 256). No special tokens."""

    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """One token's own text (its byte, or U+FFFD for part of a character)."""
        return self.decode([token])

    def decoder(self) -> _ByteDecoder:
        """An incremental decoder: feed token ids, get the text completed so far."""
        return _ByteDecoder()


class _ByteDecoder:
    """UTF-8 decoded as bytes arrive: an incomplete character is held back until the bytes
    that complete it come, or until ``flush``."""

    def __init__(self) -> None:
        self._inc = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> str:
        return self._inc.decode(bytes(ids))

    def flush(self) -> str:
        """The held-back bytes of an unfinished character, as U+FFFD (``errors="replace"``,
        what decoding all the bytes at once gives)."""
        return self._inc.decode(b"", final=True)


def _token_str(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken
    dict (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path, config: dict) -> str | None:
    """The folder's chat template: ``tokenizer_config.json``'s ``chat_template`` (a string,
    or a list of named ones: ``default`` is used), else ``chat_template.jinja``, else
    ``chat_template.json``."""
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str) and tpl:
        return tpl
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = _read_json(folder / "chat_template.json").get("chat_template")
    return tpl if isinstance(tpl, str) and tpl else None


class HFTokenizer:
    """A Hugging Face model folder's tokenizer (``tokenizer.json``), special tokens, chat
    template and end-of-sequence ids.

    Attributes:
      eos_ids: token ids that end a generation (``generation_config.json``'s
        ``eos_token_id``, else the tokenizer's ``eos_token``).
      chat_template: the folder's Jinja chat template, or None.
      special_tokens: ``bos_token``, ``eos_token``, ... as strings (the template's variables).
    """

    def __init__(self, path: str | Path) -> None:
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        self.special_tokens = {k: t for k, v in config.items()
                               if k.endswith("_token") and (t := _token_str(v)) is not None}
        self.chat_template = _chat_template(folder, config)
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self._tok, self._slow = Tokenizer.from_file(str(folder / "tokenizer.json")), None
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ValueError(
                    f"{folder} has no tokenizer.json (only a slow tokenizer); install "
                    "transformers (pip install jds[convert]) to read it, or save a fast "
                    "tokenizer into the folder") from None
            self._tok, self._slow = None, AutoTokenizer.from_pretrained(str(folder))
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        if eos is None and "eos_token" in self.special_tokens:
            eos = self._token_id(self.special_tokens["eos_token"])
        self.eos_ids = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos])
                             if isinstance(t, int))

    def _token_id(self, token: str) -> int | None:
        if self._slow is not None:
            return self._slow.convert_tokens_to_ids(token)
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` as the tokenizer's post-processor
        says (a BOS for Llama), off for text a chat template rendered."""
        if self._slow is not None:
            return list(self._slow.encode(text, add_special_tokens=add_special_tokens))
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        if self._slow is not None:
            return self._slow.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's own text (as OpenAI's ``logprobs`` lists it)."""
        return self.decode([token])

    def decoder(self) -> _HFDecoder:
        """An incremental decoder: feed token ids, get the text completed so far."""
        return _HFDecoder(self)


class _HFDecoder:
    """A tokenizer's text, grown token by token. Text that ends in U+FFFD (the bytes of a
    character split across tokens) is held back until a later token completes it, or until
    ``flush``."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok, self._ids, self._text = tok, [], ""

    def _new(self, final: bool) -> str:
        text = self._tok.decode(self._ids)
        if not final and text.endswith("\ufffd"):  # an incomplete character: wait
            return ""
        new, self._text = text[len(self._text):], text
        return new

    def __call__(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        return self._new(final=False)

    def flush(self) -> str:
        """What was held back, as the tokenizer decodes it (U+FFFD for an unfinished
        character, as decoding the whole answer at once gives)."""
        return self._new(final=True)


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_for(model: str | Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer strings are encoded with: the model folder's own, bytes for a
    byte-level model (vocab 256) without one, else None (token-id prompts only)."""
    path = Path(str(model))
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json",
                                                           "tokenizer_config.json")):
        return HFTokenizer(path)
    return ByteTokenizer() if vocab_size == 256 else None


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """A chat template compiled as ``transformers`` compiles one (see the module docstring)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


def render_chat(template: str, messages: list[dict[str, Any]], *,
                special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text of a chat: ``messages`` rendered with ``template``.

    Raises:
      TemplateError: the template refused the messages or failed to render.
    """
    import jinja2

    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**(special_tokens or {}), **extra})
    except TemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        raise TemplateError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {e}") from None


__all__ = ["DEFAULT_CHAT_TEMPLATE", "ByteTokenizer", "HFTokenizer", "TemplateError",
           "Tokenizer", "render_chat", "tokenizer_for"]
