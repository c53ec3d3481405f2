"""`type: chat_template`: render a conversation with a Jinja chat template and mark trained turns.

Turn boundaries are found by rendering prefix conversations (messages[:1], messages[:2], ...)
and checking each is a prefix of the full rendering: this works for any template whose
rendering is append-only, without needing `{% generation %}` markers, and it never guesses at
token boundaries (tokenization maps the character spans to tokens afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dft_peft.config.chat_templates import accepted_template_names, template_text
from dft_peft.config.datasets import DEFAULT_ROLE_ALIASES
from dft_peft.data.segments import RowError
from dft_peft.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from dft_peft.data.segments import FormatContext, Segment
    from dft_peft.config.datasets import DatasetConfig

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
        named = template_text(override)  # Axolotl's own Jinja text for its template names
        if named is not None:
            return named
        known = [TOKENIZER_DEFAULT, *sorted(accepted_template_names())]
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
        message = {"role": cfg.canonical_role(str(msg[role_key])), "content": str(msg[content_key])}
        if cfg.template_thinking_key and msg.get(cfg.field_thinking) is not None:  # as Axolotl: under the template's name
            message[cfg.template_thinking_key] = str(msg[cfg.field_thinking])
        out.append(message)
    if cfg.drop_system_message and out[0]["role"] == "system":
        out = out[1:]  # Axolotl drops the row's system turn (not a template's default one)
    return out


def _render(ctx: FormatContext, messages: list[dict[str, str]]) -> str:

    try:
        return ctx.tokenizer.apply_chat_template(
            messages, chat_template=ctx.chat_template, tokenize=False, add_generation_prompt=False
        )
    except Exception as err:  # the template's own checks (e.g. "roles must alternate") or a Jinja bug
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RowError(f"the chat template failed on the first {len(messages)} messages: {reason}") from err


def check_trained_roles(messages: list[dict[str, str]], cfg: DatasetConfig) -> None:
    """A row with no trained message is dropped, unless that is a naming mistake: a misspelled
    `roles_to_train` entry, or data roles that match no known role (then every row would go)."""

    found = sorted({m["role"] for m in messages})
    for wanted in cfg.roles_to_train:
        near = did_you_mean(wanted, found)
        if near:
            raise RowError(f"roles_to_train `{wanted}` matches no message (roles found: {', '.join(found)}).{near}")
    known = set(cfg.roles if cfg.roles is not None else DEFAULT_ROLE_ALIASES)
    if not known & set(found):
        raise RowError(
            f"message roles {', '.join(f'`{r}`' for r in found)} match none of roles_to_train "
            f"({', '.join(cfg.roles_to_train)}) or the known roles ({', '.join(sorted(known))}); map them with "
            "`roles: {assistant: [...], user: [...]}` in the dataset entry, or fix roles_to_train."
        )


def chat_segments(row: Mapping[str, Any], cfg: DatasetConfig, ctx: FormatContext) -> list[Segment]:
    """Split the rendered conversation into header / content / end-of-turn / trailing pieces.

    Only the content and the end-of-turn marker of a trained role are trainable: the role header
    is fixed by the template (nothing to learn) and whitespace after the marker is the template's
    separator, not part of the reply.
    """

    messages = _messages(row, cfg)
    full = _render(ctx, messages)
    train_roles = set(cfg.roles_to_train)
    trained = [i for i, m in enumerate(messages) if m["role"] in train_roles]
    if not trained:
        check_trained_roles(messages, cfg)
    last_trained = trained[-1] if trained else -1
    eos_mode = cfg.train_on_eos or "turn"
    markers = turn_markers(cfg, ctx)

    segments: list[Segment] = []
    prev = 0
    for i, message in enumerate(messages):
        upto = full if i == len(messages) - 1 else _render(ctx, messages[: i + 1])
        if not full.startswith(upto) or len(upto) < prev:
            # Not append-only (Qwen3 drops earlier turns' empty <think> blocks, metharme ends the
            # first turn with EOS only when it is the last): find the turns in order instead.
            return located_segments(messages, full, cfg, ctx, markers)
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
        pos, content = _with_thinking(span, 0, pos, content, message, cfg)
        head, body, tail = span[:pos], span[pos : pos + len(content)], span[pos + len(content) :]
        is_trained = message["role"] in train_roles
        segments.extend([(head, False), (body, is_trained)])
        if markers is not None:  # Axolotl's eot_tokens / train_on_eot: only those tokens
            segments.extend(markers.tail_segments(tail, is_trained, i == last_trained))
            prev = end
            continue
        eot = tail.rstrip()
        eot_trained = eos_mode == "all" or (
            is_trained and (eos_mode == "turn" or (eos_mode == "last" and i == last_trained))
        )
        segments.extend([(eot, eot_trained), (tail[len(eot) :], False)])
        prev = end
    segments.append((full[prev:], False))
    return [s for s in segments if s[0]]


class TurnMarkers:
    """Axolotl's end-of-turn rule: after a turn's text, the first EOT token (`eot_tokens`, by
    default the EOS token) is trained by `train_on_eot` and the first EOS token by
    `train_on_eos` (`all` / `turn` / `last` / `none`); nothing else after the text is trained."""

    def __init__(self, eot_tokens: list[str], eos_token: str | None, eot_mode: str, eos_mode: str):
        self.eot_tokens = [t for t in eot_tokens if t]
        self.eos_token = eos_token
        self.eot_mode = eot_mode
        self.eos_mode = eos_mode

    @staticmethod
    def _trained(mode: str, turn_trained: bool, last: bool) -> bool:
        return mode == "all" or (turn_trained and (mode == "turn" or (mode == "last" and last)))

    def tail_segments(self, tail: str, turn_trained: bool, last: bool) -> list[Segment]:
        spans: dict[tuple[int, int], bool] = {}
        hits = [(tail.find(t), t) for t in self.eot_tokens if tail.find(t) >= 0]
        if hits:
            pos, token = min(hits)
            spans[(pos, pos + len(token))] = self._trained(self.eot_mode, turn_trained, last)
        if self.eos_token and (pos := tail.find(self.eos_token)) >= 0:
            span = (pos, pos + len(self.eos_token))
            spans[span] = spans.get(span, False) or self._trained(self.eos_mode, turn_trained, last)
        out: list[Segment] = []
        cursor = 0
        for (start, stop), trained in sorted(spans.items()):
            if start < cursor:  # overlapping markers: the first one wins
                continue
            out.extend([(tail[cursor:start], False), (tail[start:stop], trained)])
            cursor = stop
        out.append((tail[cursor:], False))
        return out


def turn_markers(cfg: DatasetConfig, ctx: FormatContext) -> TurnMarkers | None:
    """Axolotl's token-exact end-of-turn rule when the config asks for it (`eot_tokens` or
    `train_on_eot` set); None keeps dft-peft's default, which trains the template's whole
    end-of-turn marker (e.g. `<|im_end|>` even when the tokenizer's EOS is another token)."""

    if cfg.eot_tokens is None and cfg.train_on_eot is None:
        return None
    eos = ctx.eos_token
    eos_mode = cfg.train_on_eos or "turn"
    eot_mode = cfg.train_on_eot or eos_mode
    eot_tokens = list(cfg.eot_tokens) if cfg.eot_tokens is not None else ([eos] if eos else [])
    for token in eot_tokens:
        if len(ctx.tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise UserError(
                f"eot_tokens: {token!r} is not one token for this tokenizer (Axolotl refuses this too); "
                "add it under `tokens:` or pick the template's end-of-turn token"
            )
    if eos in eot_tokens and eot_mode != eos_mode:
        raise UserError(
            f"train_on_eot: {eot_mode} and train_on_eos: {eos_mode} disagree while the EOS token {eos!r} "
            "is one of eot_tokens (Axolotl refuses this too); make them equal or drop it from eot_tokens"
        )
    return TurnMarkers(eot_tokens, eos, eot_mode, eos_mode)


def located_segments(
    messages: list[dict[str, str]], full: str, cfg: DatasetConfig, ctx: FormatContext, markers: TurnMarkers | None
) -> list[Segment]:
    """Segments for a template whose prefix renderings are not prefixes of the whole: each
    message's text is found in order in the full rendering, and its end-of-turn marker is the
    text that follows it when the conversation is rendered up to that message, where the full
    rendering has the same text there."""

    train_roles = set(cfg.roles_to_train)
    trained = [i for i, m in enumerate(messages) if m["role"] in train_roles]
    last_trained = trained[-1] if trained else -1
    eos_mode = cfg.train_on_eos or "turn"
    segments: list[Segment] = []
    cursor = 0
    for i, message in enumerate(messages):
        content = message["content"]
        pos = full.find(content, cursor) if content else -1
        if pos < 0 and content.strip():
            content = content.strip()
            pos = full.find(content, cursor)
        if pos < 0:
            if content.strip():
                raise RowError(
                    f"{cfg.field_messages}[{i}]: its text does not appear in the chat template's output "
                    "(the template rewrites it); use a template that renders message content verbatim"
                )
            continue
        is_trained = message["role"] in train_roles
        end = pos + len(content)
        pos, _ = _with_thinking(full, cursor, pos, content, message, cfg)
        segments.extend([(full[cursor:pos], False), (full[pos:end], is_trained)])
        cursor = end
        marker = _marker_after(ctx, messages[: i + 1], content)
        if not marker or not full.startswith(marker, end):
            continue
        if markers is not None:
            segments.extend(markers.tail_segments(marker, is_trained, i == last_trained))
        else:
            eot_trained = eos_mode == "all" or (
                is_trained and (eos_mode == "turn" or (eos_mode == "last" and i == last_trained))
            )
            segments.append((marker, eot_trained))
        cursor = end + len(marker)
    segments.append((full[cursor:], False))
    return [s for s in segments if s[0]]


def _with_thinking(
    text: str, start: int, pos: int, content: str, message: dict[str, str], cfg: DatasetConfig
) -> tuple[int, str]:
    """(pos, body) widened back to the message's reasoning trace where the template rendered it
    before the reply: Axolotl trains a turn from its reasoning through its content, the template's
    separators between them included. A template that drops the trace (earlier turns) leaves the
    reply alone."""
    thinking = message.get(cfg.template_thinking_key or "", "").strip()
    at = text.find(thinking, start, pos) if thinking else -1
    if at < 0:
        return pos, content
    return at, text[at : pos + len(content)]


def _marker_after(ctx: FormatContext, messages: list[dict[str, str]], content: str) -> str:
    """The end-of-turn text the template puts after the last message's text ('' if none)."""
    try:
        alone = _render(ctx, messages)
    except Exception:  # noqa: BLE001 - e.g. a template that refuses to end on a user turn
        return ""
    at = alone.rfind(content)
    return alone[at + len(content) :].rstrip() if at >= 0 else ""
