"""An Ollama `Modelfile` beside the GGUF: `ollama create NAME -f Modelfile` imports it.

Ollama's TEMPLATE is a Go template, not the Jinja chat template the tokenizer carries, so the
three chat formats of the supported families are recognised by their marker tokens and written
as Go templates: ChatML (SmolLM2, Qwen2), Llama-3 headers, and Mistral's [INST]. Any other chat
template gets no TEMPLATE line (the documented fallback): Ollama then uses the template it
recognises from the GGUF's own `tokenizer.chat_template`, or sends the prompt as it is. The stop
parameters are the format's end-of-turn markers plus the tokenizer's EOS token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

MISTRAL = """{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

FORMATS = {
    "chatml": ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("[INST]", MISTRAL, ["[INST]", "[/INST]"]),
}

# A default system prompt written into a ChatML template as a literal (SmolLM2's is).
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>")


def chat_format(chat_template: str | None) -> str | None:
    """`chatml`, `llama3`, `mistral`, or None for a template (or its absence) not translated."""
    if not chat_template:
        return None
    return next((name for name, (marker, _, _) in FORMATS.items() if marker in chat_template), None)


def default_system_prompt(chat_template: str | None) -> str | None:
    match = _CHATML_SYSTEM.search(chat_template or "")
    return match.group(1) if match and "'" not in match.group(1) and '"' not in match.group(1) else None


def render_modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    fmt = chat_format(chat_template)
    lines = ["# Ollama: ollama create NAME -f Modelfile   (written by dft-peft export)", f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if fmt is not None:
        _, template, stops = FORMATS[fmt]
        lines += [f'TEMPLATE """{template}"""', ""]
        system = default_system_prompt(chat_template)
        if fmt == "chatml" and system:
            lines += [f'SYSTEM """{system}"""', ""]
    elif chat_template:
        lines += [
            "# No TEMPLATE: this chat template is not ChatML, Llama-3 or Mistral, which dft-peft translates.",
            "# Ollama uses the template it recognises from the GGUF's tokenizer.chat_template, else the raw prompt.",
            "",
        ]
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""', ""]
    for stop in dict.fromkeys([*stops, *([eos_token] if eos_token else [])]):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines).rstrip() + "\n"


def write_modelfile(gguf_path: Path, tokenizer: Any) -> Path:
    """`Modelfile` in the GGUF's folder, pointing at it by relative path."""
    path = gguf_path.parent / "Modelfile"
    text = render_modelfile(gguf_path.name, getattr(tokenizer, "chat_template", None), tokenizer.eos_token)
    path.write_text(text, encoding="utf-8")
    return path
