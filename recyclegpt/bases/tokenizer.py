"""Tokenizers behind one small interface: ``encode``, ``decode``, ``eos_token_ids``, ``pad_token_id``.

``HFTokenizer`` wraps a transformers tokenizer (with its chat template); ``ByteTokenizer`` maps UTF-8
bytes to ids 0..255 for tiny test models.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); no EOS unless one is given. For tiny models and tests."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_ids = set() if eos_token_id is None else {eos_token_id}
        self.pad_token_id = 0
        self.vocab_size = 256
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat(self, messages: list[dict[str, str]]) -> str:
        """No template: the contents joined by newlines."""
        return "\n".join(m["content"] for m in messages) + "\n"


class HFTokenizer:
    """A transformers tokenizer with its special tokens and chat template.

    Args:
        tok: a ``PreTrainedTokenizerBase``.
        extra_eos: further token strings that end a turn (e.g. ``<|im_end|>``, ``<end_of_turn>``).
    """

    def __init__(self, tok, extra_eos: Sequence[str] = ()) -> None:
        self.tok = tok
        eos = set()
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        vocab = tok.get_vocab()
        eos |= {vocab[t] for t in extra_eos if t in vocab}
        self.eos_token_ids = eos
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
        self.vocab_size = len(tok)
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant turn's opening."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages) + "\n"
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
