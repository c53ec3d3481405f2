"""`type: chat_template`: render a conversation with a Jinja chat template and mark trained turns.

Turn boundaries are found by rendering prefix conversations (messages[:1], messages[:2], ...)
and checking each is a prefix of the full rendering: this works for any template whose
rendering is append-only, without needing `{% generation %}` markers, and it never guesses at
token boundaries (tokenization maps the character spans to tokens afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dft_peft.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from dft_peft.data.formats import FormatContext, Segment
    from dft_peft.data.spec import DatasetConfig

# The ChatML template (as used by Qwen/OpenHermes) for tokenizers that ship none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 header format; message text is stripped as Meta's template does.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5: ChatML with Qwen's default system message when the conversation has none (no tools).
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "qwen_25": QWEN25_TEMPLATE}
TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def resolve_chat_template(override: str | None, tokenizer: Any, where: str) -> str:
    """The Jinja source to render with: an inline template, a named one, or the tokenizer's own.

    `where` names the config entry in the error, because a missing template is a config mistake
    that would otherwise surface as a cryptic Jinja/transformers error on the first row.
    """
    if override and ("{%" in override or "{{" in override):
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship several named templates
        template = template.get("default")
    if override and override.startswith(FALLBACK_PREFIX):
        # Axolotl's "the model's own template, else this named one"
        if template:
            return template
        override = override.removeprefix(FALLBACK_PREFIX)
    if override and override != TOKENIZER_DEFAULT:
        if override in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[override]
        known = [TOKENIZER_DEFAULT, *NAMED_TEMPLATES]
        raise UserError(
            f"{where}: chat_template `{override}` is not built into dft-peft; use one of {', '.join(known)}, "
            f"or pass the Jinja template itself (chat_template_jinja).{did_you_mean(override, known)}"
        )
    if not template:
        raise UserError(
            f"{where}: type: chat_template but the tokenizer has no chat template; set chat_template: chatml "
            "(or a Jinja template string) in the dataset entry or at the top level"
        )
    return template


def _messages(row: Mapping[str, Any], cfg: DatasetConfig) -> list[dict[str, str]]:
    from dft_peft.data.formats import RowError

    raw = row.get(cfg.field_messages)
    if not isinstance(raw, list) or not raw:
        raise RowError(
            f"missing field '{cfg.field_messages}' required by type: chat_template "
            "(set field_messages: to the column holding the message list, or fix the row)"
        )
    role_key, content_key = cfg.role_key, cfg.content_key
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, Mapping) or role_key not in msg or msg.get(content_key) is None:
            raise RowError(
                f"{cfg.field_messages}[{i}] needs keys '{role_key}' and '{content_key}' "
                "(set message_property_mappings: {role: ..., content: ...} to your key names)"
            )
        out.append({"role": cfg.canonical_role(str(msg[role_key])), "content": str(msg[content_key])})
    return out


def _render(ctx: FormatContext, messages: list[dict[str, str]]) -> str:
    from dft_peft.data.formats import RowError

    try:
        return ctx.tokenizer.apply_chat_template(
            messages, chat_template=ctx.chat_template, tokenize=False, add_generation_prompt=False
        )
    except Exception as err:  # the template's own checks (e.g. "roles must alternate") or a Jinja bug
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RowError(f"the chat template failed on the first {len(messages)} messages: {reason}") from err


def chat_segments(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    """Split the rendered conversation into header / content / end-of-turn / trailing pieces.

    Only the content and the end-of-turn marker of a trained role are trainable: the role header
    is fixed by the template (nothing to learn) and whitespace after the marker is the template's
    separator, not part of the reply.
    """
    from dft_peft.data.formats import RowError

    messages = _messages(row, cfg)
    full = _render(ctx, messages)
    train_roles = set(cfg.roles_to_train)
    trained = [i for i, m in enumerate(messages) if m["role"] in train_roles]
    last_trained = trained[-1] if trained else -1
    eos_mode = cfg.train_on_eos or "turn"

    segments: list[Segment] = []
    prev = 0
    for i, message in enumerate(messages):
        upto = full if i == len(messages) - 1 else _render(ctx, messages[: i + 1])
        if not full.startswith(upto) or len(upto) < prev:
            raise RowError(
                f"the chat template's rendering of the first {i + 1} messages is not a prefix of the whole "
                "conversation, so trained turns cannot be located; use an append-only template (chat_template:)"
            )
        span, end = full[prev : len(upto)], len(upto)
        content = message["content"]
        pos = span.rfind(content) if content else -1
        if pos < 0 and content.strip():
            content = content.strip()  # many templates strip message text
            pos = span.rfind(content)
        if pos < 0:
            if content.strip():
                raise RowError(
                    f"{cfg.field_messages}[{i}]: its text does not appear in the chat template's output "
                    "(the template rewrites it); use a template that renders message content verbatim"
                )
            segments.append((span, False))
            prev = end
            continue
        head, body, tail = span[:pos], span[pos : pos + len(content)], span[pos + len(content) :]
        eot = tail.rstrip()
        is_trained = message["role"] in train_roles
        eot_trained = eos_mode == "all" or (
            is_trained and (eos_mode == "turn" or (eos_mode == "last" and i == last_trained))
        )
        segments.extend([(head, False), (body, is_trained), (eot, eot_trained), (tail[len(eot) :], False)])
        prev = end
    segments.append((full[prev:], False))
    return [s for s in segments if s[0]]
