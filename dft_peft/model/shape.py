"""A decoder-only transformer's shape, from its config alone, for the memory planner.

The config comes from one place, `model_config`: a local folder or config.json, a GGUF header (the
tensors are not read), or a hub id's cached config.json. Nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a decoder-only transformer (Llama family layout:
    q/k/v/o attention, gated MLP, two RMSNorms per layer)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def bias_params_per_layer(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = 0
        if self.attention_bias:  # Qwen2 biases q/k/v only; Llama's attention_bias covers o_proj too
            attn = q + 2 * kv + (0 if self.model_type == "qwen2" else self.hidden)
        mlp = 2 * self.intermediate + self.hidden if self.mlp_bias else 0
        return attn + mlp

    def other_params(self) -> int:
        """Parameters outside the decoder layers' linears: embeddings, head, norms, biases."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return embed + norms + self.layers * self.bias_params_per_layer()

    def parameter_count(self) -> int:
        return self.layers * self.linear_params_per_layer() + self.other_params()


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """A `ModelShape` from a transformers `config.json` mapping (nested text_config accepted)."""
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "model_type": config.get("model_type")}
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    if experts:
        raise UserError(f"the memory planner does not model mixture-of-experts models yet ({experts} experts per layer).")
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        model_type = str(config.get("model_type") or "llama")
        return ModelShape(
            model_type=model_type,
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without the config saying so.
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except KeyError as exc:
        raise UserError(f"model config has no `{exc.args[0]}`: the memory planner needs a decoder-only transformer config.") from None


def config_from_gguf(path: str | Path) -> dict[str, Any]:
    """The transformers-style config fields from a GGUF header (the tensors are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    arch = fields["general.architecture"].contents()

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(fields["tokenizer.ggml.tokens"].data)
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


def model_config(
    base_model: str, *, revision: str | None = None, base_model_config: str | None = None, gguf_file: str | None = None
) -> dict[str, Any]:
    """The one place the planner reads a model config from: a local folder or config.json, a
    `.gguf` file or `pkg://` GGUF (header only, no conversion), or a hub id's cached config.

    Hub downloading (issue 9) plugs in here: today a hub id's config must be in the local cache.
    """
    source = base_model_config or base_model
    if gguf_file and not base_model_config and Path(base_model, gguf_file).is_file():
        return config_from_gguf(Path(base_model, gguf_file))
    if source.startswith("pkg://"):
        from dft_peft.model.source import package_file

        return config_from_gguf(package_file(source))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"base_model: GGUF file `{source}` not found; check the path.")
        return config_from_gguf(path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    raise UserError(f"memory planner: no config.json for `{source}` locally or in the Hugging Face cache; download the model first.")
