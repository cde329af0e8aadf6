"""The decode request: what every decoding strategy and the serving engine check once.

A request is resolved from what its caller gives (prompt ids, sampling parameters, the
tokenizer, the model's config) into one checked object, and refused with a typed error that
names what was wrong and what is accepted. Callers tell error kinds apart by type, never by
reading the message.
"""

from __future__ import annotations


class DecodeRequestError(ValueError):
    """A request that cannot be decoded as given; the message says what to change."""


class ContextLengthError(DecodeRequestError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the model's context."""
