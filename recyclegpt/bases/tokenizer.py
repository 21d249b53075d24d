"""Tokenizers behind one small interface: ``encode``, ``decode``, ``bos_token_id``, ``eos_token_ids``,
``pad_token_id``.

``encode(text)`` gives a model input: it starts with the model's BOS token when the model's own tokenizer
puts one there (Gemma: ``<bos>``; SmolLM2: none), so every path that feeds text to a model (prompts, chat,
corpora, evaluation) encodes the way the model was trained. ``encode(text, bos=False)`` encodes a fragment.

``HFTokenizer`` wraps a transformers tokenizer (with its chat template); ``ByteTokenizer`` maps UTF-8
bytes to ids 0..255 for tiny test models.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); no BOS, no EOS unless one is given. For tiny models and tests."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.bos_token_id = None
        self.eos_token_ids = set() if eos_token_id is None else {eos_token_id}
        self.pad_token_id = 0
        self.vocab_size = 256
        self.chat_template = None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """The UTF-8 bytes of ``text`` (no BOS to add, whatever ``bos`` says)."""
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
        # Ask the tokenizer what it does: transformers 5 reports ``add_bos_token=False`` for Gemma although
        # ``tok(text)`` starts with <bos>, and SmolLM2 names a ``bos_token`` that it never prepends.
        bos = tok.bos_token_id
        self.bos_token_id = bos if bos is not None and tok("a").input_ids[:1] == [bos] else None
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
        self.vocab_size = len(tok)
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<bos>``, ``<|im_start|>``) become their ids.

        Args:
            text: the text.
            bos: start with ``bos_token_id`` (when the tokenizer has one) unless the text already does, as a
                chat template's ``<bos>`` does: a model input never gets two. False for a fragment that
                will not start a model input.
        """
        ids = self.tok.encode(text, add_special_tokens=False)
        if bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant turn's opening."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages) + "\n"
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def trim_chat(tokenizer, system: list[dict[str, str]], history: list[dict[str, str]], room: int, limit: int
              ) -> str | None:
    """The prompt for ``system + history`` that leaves ``room`` tokens for the reply within ``limit`` tokens
    (the model's context), as the ``chat`` command builds each turn.

    Drops the oldest exchanges (a user message and its reply) from ``history``, in place, until it fits;
    None if the last message alone does not.
    """
    while True:
        prompt = tokenizer.apply_chat(system + history)
        if len(tokenizer.encode(prompt)) + room + 1 <= limit:
            return prompt
        if len(history) == 1:
            return None
        del history[:2]  # the oldest user message and its reply
