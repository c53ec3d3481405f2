"""Axolotl's `tokenizer_use_mistral_common`: the tokenizer is mistral-common's, through
transformers' `MistralCommonBackend`, and conversations are rendered by mistral-common itself.

As in Axolotl 0.19 (src/axolotl/utils/mistral/mistral_tokenizer.py, loaders/tokenizer.py): the
tokenizer file (`tekken.json`) is loaded in mistral-common's *finetuning* validation mode (a
conversation ends with the assistant's reply), the Jinja `chat_template` is ignored (mistral-common
builds the request: `[INST]`, `[SYSTEM_PROMPT]`, ... control tokens, where the model's own
format puts them), and the tokenizer cannot be edited (`special_tokens`, `tokens` and
`chat_template` are refused, as Axolotl refuses them).

dft-peft's chat path renders a conversation (and its prefixes, to find the turns) as text and then
tokenizes the pieces; mistral-common never encodes control-token text as control tokens. So the
text encoding here splits the rendered text at control-token strings and encodes the text between
them with the Tekken vocabulary: the ids are exactly those of mistral-common's own
`encode_chat_completion` (tests/test_axolotl_moe_mistral.py checks this against mistral-common).
Tekken tokenizers only (every Mistral model that Axolotl's examples use this key with); the older
SentencePiece files are refused.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError

INSTALL_HINT = "tokenizer_use_mistral_common: true needs mistral-common: pip install 'dft-peft[mistral]'"
CHAT_TEMPLATE_NOTE = "[mistral-common renders the conversation; no Jinja template]"


def check_mistral_options(cfg: Any) -> None:
    """What Axolotl refuses with the key (validation.py `check_mistral_common_incompatible_options`)."""
    if importlib.util.find_spec("mistral_common") is None:
        raise UserError(INSTALL_HINT)
    for key in ("special_tokens", "tokens", "chat_template", "chat_template_jinja"):
        if getattr(cfg, key, None):
            raise UserError(
                f"`{key}` cannot be used with tokenizer_use_mistral_common: true (mistral-common's tokenizer is not "
                "edited and renders conversations itself, as in Axolotl); remove one of the two."
            )


def _backend_class():
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers.tokenization_mistral_common import MistralCommonBackend

    class MistralChatTokenizer(MistralCommonBackend):
        """MistralCommonBackend in finetuning mode whose text encoding reads control tokens."""

        is_fast = False  # no offsets: dft-peft's data path encodes segment by segment

        @property
        def chat_template(self) -> str:  # resolve_chat_template wants one; it is never rendered
            return CHAT_TEMPLATE_NOTE

        @chat_template.setter
        def chat_template(self, value: Any) -> None:
            pass

        @property
        def _inner(self):
            return self.tokenizer.instruct_tokenizer.tokenizer

        @cached_property
        def _control_pattern(self) -> tuple[re.Pattern, dict[str, int]]:
            pieces = {self._inner.id_to_piece(i): i for i in sorted(self._inner.special_ids)}
            pieces = {p: i for p, i in pieces.items() if p}
            alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
            return re.compile(f"({alternatives})"), pieces

        def _text_to_ids(self, text: str, add_special_tokens: bool) -> list[int]:
            pattern, pieces = self._control_pattern
            ids: list[int] = [self._inner.bos_id] if add_special_tokens else []
            for i, part in enumerate(pattern.split(text)):
                if i % 2:
                    ids.append(pieces[part])
                elif part:
                    ids.extend(self._inner.encode(part, bos=False, eos=False))
            if add_special_tokens and self._mode == ValidationMode.finetuning:
                ids.append(self._inner.eos_id)
            return ids

        def _set_validation_mode(self, mode: Any) -> None:
            validator = getattr(self.tokenizer, "_chat_completion_request_validator", None)
            if validator is None or not hasattr(validator, "_mode"):
                raise UserError("this mistral-common version has no validation mode to switch; use mistral-common 1.13.")
            validator._mode = mode

        def apply_chat_template(self, conversation: Any, chat_template: Any = None,
                                add_generation_prompt: bool = False, **kwargs: Any):
            """mistral-common's rendering; a conversation that does not end with the assistant
            (a prefix, or a prompt for generation) is rendered in test mode, as Axolotl does."""
            kwargs.pop("add_special_tokens", None)
            messages = conversation[-1] if conversation and isinstance(conversation[0], list) else conversation
            open_end = add_generation_prompt or (messages and messages[-1].get("role") != "assistant")
            if open_end:
                self._set_validation_mode(ValidationMode.test)
            try:
                out = super().apply_chat_template(conversation, **kwargs)
                if kwargs.get("tokenize", True) is False and isinstance(out, str):
                    exact = super().apply_chat_template(conversation, **{**kwargs, "tokenize": True, "return_dict": True})
                    if self._text_to_ids(out, False) != list(exact["input_ids"]):
                        # the text holds a control token's name (e.g. a literal "[INST]"): as text it
                        # would be read back as the control token; fail loudly, never mis-tokenize
                        raise ValueError("a message contains the text of a mistral-common control token (e.g. [INST])")
                return out
            finally:
                if open_end:
                    self._set_validation_mode(ValidationMode.finetuning)

    MistralChatTokenizer.Tekkenizer = Tekkenizer
    return MistralChatTokenizer


def load_mistral_tokenizer(source: str | Path, revision: str | None = None):
    """The mistral-common tokenizer of a local folder or hub repo (its tekken.json), finetuning mode."""
    if importlib.util.find_spec("mistral_common") is None:
        raise UserError(INSTALL_HINT)
    import warnings

    cls = _backend_class()
    kwargs = {"revision": revision} if revision else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tokenize=False is unsafe": handled by _text_to_ids
        tokenizer = cls.from_pretrained(str(source), mode="finetuning", padding_side="right", **kwargs)
    if not isinstance(tokenizer._inner, cls.Tekkenizer):
        raise UserError(
            "tokenizer_use_mistral_common: true supports Tekken tokenizers (tekken.json); this model's tokenizer is "
            "SentencePiece: drop the key to use its transformers tokenizer."
        )
    return tokenizer
