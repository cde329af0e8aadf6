"""Tokenization for genforge: Hugging Face tokenizer directories, chat templates, streaming detokenization.

`Tokenizer` loads a directory written by `transformers` (`tokenizer.json` plus `tokenizer_config.json`,
`special_tokens_map.json`, `chat_template.jinja`) with the `tokenizers` library and behaves like
`transformers.AutoTokenizer` (4.x "fast" / 5.x "tokenizers" backend) for it, without importing transformers.
`IncrementalDecoder` turns a stream of generated token ids into text pieces whose concatenation is exactly
`Tokenizer.decode` of the whole sequence.
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import tokenizers

from .atomic import atomic_write_text
from .spm import SPM_FILE, SentencePieceError, sentencepiece_backend

__all__ = ["Tokenizer", "IncrementalDecoder", "TokenizerError", "ChatTemplateError"]

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = SPM_FILE  # read when there is no tokenizer.json (Llama 2, T5)
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "chat_templates"
# The named special tokens, in the order transformers lists them in `all_special_tokens`.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXPECTED_FILES = (
    f"{TOKENIZER_FILE} (required) and optionally {CONFIG_FILE}, {SPECIAL_TOKENS_MAP_FILE}, {CHAT_TEMPLATE_FILE}"
)


class TokenizerError(ValueError):
    """Bad tokenizer files or bad input to a tokenizer."""


class ChatTemplateError(TokenizerError):
    """A chat template is missing, does not compile, or refused to render a conversation."""


class Tokenizer:
    """A Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`) driven by the `tokenizers` library.

    `config` is a `tokenizer_config.json`-style mapping: special tokens (strings or `{"content": ...}`
    AddedToken dicts), `chat_template` (a string, or a list of `{name, template}`), `model_max_length`,
    `add_bos_token`/`add_eos_token`, `clean_up_tokenization_spaces`, `split_special_tokens`. The backend is
    adopted, not copied: special tokens are added to it and its truncation/padding switched off.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"genforge: Tokenizer needs a tokenizers.Tokenizer backend, got {type(backend).__name__}")
        config = dict(config or {})
        self._backend = backend
        self._config = config  # kept whole so that save() carries keys genforge does not interpret
        self._named, self._extra = _special_tokens_from_config(config)
        self._add_missing_special_tokens(config)

        # transformers keeps the post-processor of tokenizer.json and, when that file exists, drops
        # `add_bos_token`/`add_eos_token` from the config before building the tokenizer (5.x,
        # PreTrainedTokenizerBase._from_pretrained): the flags are kept only to be written back by save().
        self.add_bos_token: bool | None = config.get("add_bos_token")
        self.add_eos_token: bool | None = config.get("add_eos_token")
        self.model_max_length: int | None = config.get("model_max_length")
        self.chat_template: str | dict[str, str] | None = _normalize_chat_template(config.get("chat_template"))

        # tokenizer.json may carry training-time truncation/padding (all-MiniLM-L6-v2 pads to 128);
        # transformers switches both off for a plain `tok(text)`, so do the same, but remember them for save().
        self._saved_limits: dict[str, Any] = {}
        if backend.truncation is not None or backend.padding is not None:
            state = json.loads(backend.to_str())
            self._saved_limits = {key: state.get(key) for key in ("truncation", "padding")}
            backend.no_truncation()
            backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        # transformers' decode-time clean-up (" ." -> "." and friends) was written for WordPiece and is
        # skipped for BPE models unless explicitly forced; replicate that gate.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        # That clean-up runs on the whole decoded string, so a later token can remove a space sent earlier
        # ("do n ' t" -> "don't"): streaming must then hold text back. (The WordPiece decoder's own
        # `cleanup` works token by token and needs no such care.)
        self.decode_rewrites_spaces = self._clean_up
        added_ids = backend.get_added_tokens_decoder().keys()
        self._id_limit = max([backend.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added_ids)])

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a SentencePiece `.model` file (unigram or BPE), encoding and decoding
        as the `sentencepiece` library does (see `genforge.spm`)."""
        try:
            backend, special_tokens = sentencepiece_backend(path)
        except SentencePieceError as err:
            raise TokenizerError(str(err)) from None
        config = special_tokens | {"clean_up_tokenization_spaces": False, "tokenizer_class": "TokenizersBackend"}
        return cls(backend, config)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory as `AutoTokenizer.from_pretrained(path)` would (files only, no hub)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"genforge: tokenizer directory {str(path)!r} does not exist; expected a "
                f"directory holding {_EXPECTED_FILES}"
            )
        tokenizer_file = path / TOKENIZER_FILE
        config = {}
        if not tokenizer_file.is_file() and (path / SENTENCEPIECE_FILE).is_file():
            converted = Tokenizer.from_sentencepiece(path / SENTENCEPIECE_FILE)
            backend, config = converted.backend, converted.special_tokens_map
        elif not tokenizer_file.is_file():
            names = sorted(p.name for p in path.iterdir())
            present = names[:8] + ([f"... {len(names) - 8} more"] if len(names) > 8 else [])
            raise FileNotFoundError(
                f"genforge: no {TOKENIZER_FILE} in {str(path)!r} (found: {present or 'nothing'}); expected "
                f"{_EXPECTED_FILES}, or a SentencePiece {SENTENCEPIECE_FILE}. Other slow-tokenizer files alone "
                "(vocab.txt, merges.txt) are not read: convert them once with transformers' save_pretrained."
            )
        else:
            try:
                backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
            except Exception as err:  # the Rust parser raises a bare Exception
                raise TokenizerError(f"genforge: {tokenizer_file} is not a valid tokenizers file: {err}") from err
        config = config | _read_json(path / CONFIG_FILE)
        # Legacy precedence, as in transformers: special_tokens_map.json overrides the config's special tokens
        # unless the config carries `added_tokens_decoder` (which every transformers>=4.34 save writes).
        if "added_tokens_decoder" not in config:
            config.update(_read_json(path / SPECIAL_TOKENS_MAP_FILE))
        # Template files (transformers>=4.43 saves them) take priority over the config's `chat_template`.
        templates = {}
        if (path / CHAT_TEMPLATE_FILE).is_file():
            templates["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (path / CHAT_TEMPLATE_DIR).is_dir():
            for file in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        return cls(backend, config)

    def _add_missing_special_tokens(self, config: Mapping[str, Any]) -> None:
        # Like transformers' TokenizersBackend.__init__: every special token the config names becomes an
        # added token of the backend (so it is matched whole in text and skipped by skip_special_tokens),
        # reusing its vocabulary id when it has one and appending it to the vocabulary when it has none.
        present = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        to_add: list[tokenizers.AddedToken] = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda item: int(item[0])):
            to_add.append(_added_token(value, special=bool(value.get("special", False))))
        for value in [*self._named.values(), *self._extra]:
            to_add.append(_added_token(value, special=True))
        new, seen = [], set(present)
        for token in to_add:
            if token.content not in seen:
                seen.add(token.content)
                new.append(token)
        if new:
            self._backend.add_tokens(new)

    # ------------------------------------------------------------------------------------ vocabulary

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens (transformers' `len(tokenizer)`, not its `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        model = type(self._backend.model).__name__
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, special={self.all_special_tokens})"

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._backend.id_to_token(self._check_ids([ids])[0])
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in self._check_ids(ids) if i not in skip]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (`bos_token`, ..., plus model-specific `*_token` keys) as strings."""
        return {name: _token_content(value) for name, value in self._named.items()}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [*self.special_tokens_map.values(), *(_token_content(t) for t in self._extra)]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._id_or_unk(token) for token in self.all_special_tokens]

    def _id_or_unk(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        return token_id if token_id is not None else self._backend.token_to_id(self.unk_token or "")

    def _special(name: str) -> property:  # a class-body helper, deleted below
        return property(lambda self: self.special_tokens_map.get(name), doc=f"The {name} string, or None.")

    def _special_id(name: str) -> property:
        return property(lambda self: self._id_or_unk(self.special_tokens_map.get(name)), doc=f"The {name} id.")

    bos_token, bos_token_id = _special("bos_token"), _special_id("bos_token")
    eos_token, eos_token_id = _special("eos_token"), _special_id("eos_token")
    unk_token, unk_token_id = _special("unk_token"), _special_id("unk_token")
    pad_token, pad_token_id = _special("pad_token"), _special_id("pad_token")
    sep_token, sep_token_id = _special("sep_token"), _special_id("sep_token")
    cls_token, cls_token_id = _special("cls_token"), _special_id("cls_token")
    mask_token, mask_token_id = _special("mask_token"), _special_id("mask_token")
    del _special, _special_id

    # --------------------------------------------------------------------------------- encode/decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, equal to transformers' `tok(text, add_special_tokens=...)["input_ids"]`."""
        if not isinstance(text, str):
            raise TypeError(f"genforge: encode takes a str, got {type(text).__name__}; use encode_batch for a list")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust backend)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("genforge: encode_batch takes a list of str")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, equal to transformers' `tok.decode(ids, skip_special_tokens=...)`."""
        # tokenizers' Python default is skip_special_tokens=True; always pass it explicitly.
        text = self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh `IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        # The Rust decoder silently drops unknown ids and overflows on negative ones: refuse both here.
        if isinstance(ids, (str, bytes)):
            raise TypeError("genforge: token ids must be a sequence of ints, got a string")
        if isinstance(ids, int):
            ids = [ids]
        try:
            checked = [operator.index(i) for i in ids]
        except TypeError as err:
            raise TypeError(
                f"genforge: token ids must be a flat sequence of ints ({err}); use decode_batch for a list of sequences"
            ) from err
        bad = [i for i in checked if not 0 <= i < self._id_limit]
        if bad:
            raise TokenizerError(f"genforge: token id {bad[0]} is outside the vocabulary (0..{self._id_limit - 1})")
        return checked

    # ---------------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render a conversation with the tokenizer's Jinja chat template, as transformers does.

        `chat_template` overrides the stored template (a Jinja source, or the name of one of several stored
        templates). Extra keyword arguments become template variables. `tokenize=True` returns the ids of
        the rendered text encoded without adding special tokens (the template writes them itself).
        """
        template = self._select_template(chat_template, tools)
        variables = {**self.special_tokens_map, **_plain(extra, "template arguments")}
        compiled = _compile_chat_template(template)
        inputs = dict(
            messages=_validate_messages(messages),
            tools=_validate_tools(tools),
            documents=_plain(documents, "documents"),
            add_generation_prompt=add_generation_prompt,
        )
        try:
            rendered = compiled.render(**inputs, **variables)
        except ChatTemplateError:
            raise
        except Exception as err:  # anything else raised from inside template code
            raise ChatTemplateError(
                f"genforge: the chat template failed while rendering ({type(err).__name__}: {err})"
            ) from err
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _select_template(self, chat_template: str | None, tools: Any) -> str:
        stored = self.chat_template
        if chat_template is not None and not isinstance(chat_template, str):
            raise ChatTemplateError(
                "genforge: chat_template= takes a Jinja source string or a stored template's "
                f"name, got {type(chat_template).__name__}"
            )
        if isinstance(stored, dict):
            if chat_template is not None:
                return stored.get(chat_template, chat_template)
            if tools is not None and "tool_use" in stored:
                return stored["tool_use"]
            if "default" in stored:
                return stored["default"]
            raise ChatTemplateError(
                f"genforge: this tokenizer has several chat templates {sorted(stored)} and none "
                "is named 'default'; pass chat_template=<one of those names>"
            )
        if chat_template is not None:
            return chat_template
        if stored is None:
            raise ChatTemplateError(
                f"genforge: this tokenizer has no chat template (none in {CONFIG_FILE}, no {CHAT_TEMPLATE_FILE}); "
                "pass one as apply_chat_template(..., chat_template='<Jinja source>') or set "
                "tokenizer.chat_template"
            )
        return stored

    # ------------------------------------------------------------------------------------------- save

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (each atomically) that AutoTokenizer loads back equal."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = json.loads(self._backend.to_str())
        state.update(self._saved_limits)
        atomic_write_text(path / TOKENIZER_FILE, json.dumps(state, ensure_ascii=False, indent=2))

        managed = {"added_tokens_decoder", "additional_special_tokens", "extra_special_tokens", "chat_template"}
        config = {
            k: v
            for k, v in self._config.items()
            if k not in managed and not (k.endswith("_token") and isinstance(v, (str, Mapping)))
        }
        config.update(self.special_tokens_map)
        if self._extra:
            config["extra_special_tokens"] = [_token_content(t) for t in self._extra]
        config.setdefault("tokenizer_class", "TokenizersBackend")
        for key, value in (
            ("add_bos_token", self.add_bos_token),
            ("add_eos_token", self.add_eos_token),
            ("model_max_length", self.model_max_length),
        ):
            if value is not None:
                config[key] = value
        template = self.chat_template
        if template is not None:
            config["chat_template"] = (
                template if isinstance(template, str) else [{"name": k, "template": v} for k, v in template.items()]
            )
        atomic_write_text(path / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2))
        # transformers reads these files in preference to tokenizer_config.json: keep any that exist in sync.
        if (path / SPECIAL_TOKENS_MAP_FILE).is_file():
            legacy = {**self.special_tokens_map, "extra_special_tokens": config.get("extra_special_tokens", [])}
            atomic_write_text(path / SPECIAL_TOKENS_MAP_FILE, json.dumps(legacy, ensure_ascii=False, indent=2))
        if (path / CHAT_TEMPLATE_FILE).is_file():
            default = template.get("default") if isinstance(template, dict) else template
            if default is None:
                (path / CHAT_TEMPLATE_FILE).unlink()
            else:
                atomic_write_text(path / CHAT_TEMPLATE_FILE, default)


class IncrementalDecoder:
    """Streaming detokenization: feed generated ids one at a time, get back the newly completed text.

    The standard sliding-window method: decode a window that starts a few tokens before the unsent text
    and return what it adds beyond the text already sent, so that context-dependent decoders
    (SentencePiece/Metaspace leading spaces, WordPiece `##` joins) see their left neighbour. Text that a
    later token may still change is held back: a trailing U+FFFD (a byte-level token split a UTF-8
    character), a trailing run of SentencePiece byte-fallback pieces (`<0xE6>`; the run is decoded as one
    byte string once it ends), and, under transformers' whole-string clean-up, the text after the last
    space. The pieces from `step` followed by `finish()` concatenate to exactly
    `tokenizer.decode(ids, skip_special_tokens)`.
    """

    CONTEXT = 6  # tokens of left context kept when the window slides forward

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # ids from the window start to the latest token
        self._sent = 0  # characters of decode(window) already returned
        backend = tokenizer.backend
        decoder_state = backend.decoder.__getstate__() if backend.decoder is not None else b""
        byte_pieces = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids = {i for i in byte_pieces if i is not None} if b"ByteFallback" in decoder_state else set()
        # Skipped special tokens vanish before the decoder runs, so they do not end a run of byte pieces.
        added = backend.get_added_tokens_decoder().items()
        self._transparent = {i for i, token in added if token.special} if skip_special_tokens else set()

    def step(self, token_id: int) -> str:
        """Add one token id; return the text it completes (often "", never a broken character)."""
        self._window.extend(self._tokenizer._check_ids([token_id]))
        text = self._decode(self._window)
        stable = self._stable_length(text)
        piece = text[self._sent : stable] if stable > self._sent else ""
        self._sent = max(self._sent, stable)
        self._slide(text)
        return piece

    def prime(self, context_ids: Iterable[int]) -> None:
        """Continue after `context_ids` (a prompt): their text counts as already sent.

        A continuation decoded on its own can lose the spacing it has after the prompt (a
        SentencePiece or WordPiece word at the start of a decode gets no leading space), so a
        completion's text is decode(prompt + generated) minus decode(prompt), as here.
        """
        self._window = self._tokenizer._check_ids(context_ids)[-self.CONTEXT :]
        self._sent = len(self._decode(self._window))

    def finish(self) -> str:
        """Return whatever is still held back and reset for a new sequence."""
        rest = self._decode(self._window)[self._sent :]
        self._window, self._sent = [], 0
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _stable_length(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence, completed by later bytes
            end -= 1
        if self._byte_ids:
            run = len(self._window)
            while run and (self._window[run - 1] in self._byte_ids or self._window[run - 1] in self._transparent):
                run -= 1
            if run < len(self._window):
                end = min(end, len(self._decode(self._window[:run])))
        if self._tokenizer.decode_rewrites_spaces:
            # Clean-up rules all start with a space (" .", " n't", " ' "); text before the last space is final.
            space = text.rfind(" ", 0, end)
            if space != -1:
                end = space
        return end

    def _slide(self, text: str) -> None:
        # Keep decoding cheap by dropping old tokens, but only to a start whose decode is exactly a tail of the
        # current text with some sent text before the unsent part: a start inside a UTF-8 character, on a `##`
        # piece, or one that changes the leading space fails this test, and the window simply grows.
        if len(self._window) < 3 * self.CONTEXT:
            return
        start = len(self._window) - self.CONTEXT
        shorter = self._decode(self._window[start:])
        pending = len(text) - self._sent
        if text.endswith(shorter) and len(shorter) > pending:
            self._window = self._window[start:]
            self._sent = len(shorter) - pending


# ------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"genforge: {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"genforge: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, key: str = "special token") -> str | None:
    """The string of a special token given as a string or an AddedToken-style dict `{"content": ...}`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"genforge: {key} must be a string or a dict with a 'content' string, got {value!r}")


def _added_token(value: Any, special: bool) -> tokenizers.AddedToken:
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=special)  # normalized=False for special tokens
    flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return tokenizers.AddedToken(_token_content(value), special=special, **flags)


def _special_tokens_from_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Named special tokens (standard names first, then model-specific `*_token` keys) and the extra list."""
    named = {name: config[name] for name in SPECIAL_TOKEN_NAMES if _token_content(config.get(name), name)}
    for key, value in config.items():  # e.g. Qwen2-VL's "image_token"; transformers treats these as named
        if key.endswith("_token") and key not in named and isinstance(value, (str, Mapping)):
            if _token_content(value, key) is not None:
                named[key] = value
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):  # the dict form names its tokens
        named.update({k: v for k, v in extra.items() if k not in named})
        extra = []
    if not isinstance(extra, (list, tuple)):
        raise TokenizerError(f"genforge: extra_special_tokens must be a list of tokens, got {extra!r}")
    for token in extra:
        _token_content(token, "extra special token")
    return named, list(extra)


def _normalize_chat_template(value: Any) -> str | dict[str, str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(
        "genforge: chat_template must be a Jinja string or a list of "
        f"{{'name': ..., 'template': ...}} dicts, got {type(value).__name__}"
    )


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: undo the spaces WordPiece-era tokenizers put before punctuation."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _plain(value: Any, what: str) -> Any:
    """A deep copy made of plain JSON types only: the sandboxed template then sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind, plain in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, kind):  # subclasses (str enums, numpy scalars) carry extra methods: strip them
            return plain(value)
    if isinstance(value, Mapping):
        return {_plain(k, what): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, what) for v in value)
    raise TypeError(
        f"genforge: {what} must hold JSON-like data (dict, list, str, number, bool, None); got a {type(value).__name__}"
    )


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(
            f"genforge: messages must be a non-empty list of {{'role': ..., 'content': ...}} "
            f"dicts, got {messages!r:.80}"
        )
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"genforge: message {index} must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}: {message!r:.80}"
            )
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(
                f"genforge: message {index} needs a string 'role' (e.g. 'user'), got {message!r:.80}"
            )
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(
                f"genforge: message {index} needs a 'content' (or 'tool_calls'), got {message!r:.80}"
            )
        # Like transformers: drop None values (OpenAI-style content=None) and alias the reasoning field names.
        message = _plain({k: v for k, v in message.items() if v is not None}, f"message {index}")
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


def _validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise ChatTemplateError(
            "genforge: tools must be a list of JSON-schema dicts "
            "({'type': 'function', 'function': {...}}); callables are not converted"
        )
    return _plain(list(tools), "tools")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"genforge: the chat template rejected the conversation: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); chat templates need the plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (no class-attribute escapes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace()` refusing underscore attributes, which could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the environment transformers uses (utils/chat_template_utils.py), so output matches it."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"genforge: a chat template must be a Jinja string, got {type(source).__name__}")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"genforge: the chat template is not valid Jinja (line {err.lineno}: {err.message})"
        ) from err
