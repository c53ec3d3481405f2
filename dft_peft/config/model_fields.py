"""The config fields that say which model to load and which adapter to put on it.

Kept apart from `schema.py` (the run: objective, data, training, outputs) so that each file stays
readable; `ConfigSchema` inherits these fields first, so `validate` prints them first, as before.
Names, defaults and meanings follow Axolotl's `ModelInputConfig`, `LoraConfig` and its Liger plugin.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dft_peft.config.loftq_keys import PeftFields

AttnImplementation = Literal["flash_attention_2", "sdpa", "eager", "flex_attention"]


class ModelFields(BaseModel):
    """Where the model comes from, how it is loaded (quantization, attention), and the LoRA adapter."""

    # allow_inf_nan=False: `learning_rate: .inf` is refused up front, not found as a NaN adapter.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # --- model ---------------------------------------------------------------------------------
    base_model: str = Field(description="Hub id, local folder, or pkg://<package>/<file>.gguf.")
    base_model_config: str | None = None
    tokenizer_config: str | None = None
    model_type: str | None = Field(default=None, description="e.g. AutoModelForCausalLM")
    tokenizer_type: str | None = Field(default=None, description="e.g. AutoTokenizer")
    tokenizer_legacy: bool | None = Field(default=None, description="The tokenizer's `legacy=` (SentencePiece Llama).")
    model_revision: str | None = None
    gguf_file: str | None = Field(
        default=None, description="A .gguf file in base_model (hub repo or folder), converted to safetensors once."
    )
    trust_remote_code: bool = False
    overrides_of_model_config: dict[str, Any] | None = Field(default=None, description="model config values to override (Axolotl's `model_config`).")
    resize_token_embeddings_to_32x: bool | None = Field(default=None, description="grow the embeddings to a multiple of 32 rows.")
    tokenizer_use_mistral_common: bool | None = Field(
        default=None, description="mistral-common's tokenizer (tekken.json); pip install 'dft-peft[mistral]'."
    )
    quantize_moe_experts: bool = Field(
        default=False, description="store fused MoE expert weights in 4-bit (8-bit) at load; with load_in_4bit/8bit."
    )
    llama4_linearized_experts: bool | None = Field(
        default=None, description="Llama 4 with one Linear per expert (Axolotl's linearized checkpoints)."
    )
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = Field(
        default=None, description="transformers' MoE experts kernel (the same experts, another kernel)."
    )
    model_quantization_config: Literal["Mxfp4Config", "FineGrainedFP8Config"] | None = Field(
        default=None, description="a checkpoint's own quantized format (gpt-oss MXFP4: with dequantize: true)."
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="arguments of that transformers config, e.g. {dequantize: true}."
    )
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    attn_implementation: AttnImplementation | None = Field(
        default=None, description="None: the transformers default for the model (usually sdpa)."
    )

    # --- adapter -------------------------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = None
    lora_model_dir: str | None = None
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_target_parameters: list[str] | str | None = Field(
        default=None, description="fused expert tensors (3-D parameters) to put LoRA on, via peft's target_parameters."
    )
    peft_use_rslora: bool | None = Field(default=None, description="rank-stabilised LoRA: scale alpha/sqrt(r).")
    lora_fan_in_fan_out: bool | None = Field(default=None, description="weights stored (in, out), e.g. GPT-2 Conv1D.")
    peft: PeftFields | None = Field(
        default=None, description="{loftq_config: {loftq_bits: 4}}: LoftQ init, peft quantizes the full-precision base."
    )

    # --- kernels (Axolotl's LigerPlugin keys; applied when liger-kernel is installed) ------------
    liger_rope: bool | None = None
    liger_rms_norm: bool | None = None
    liger_layer_norm: bool | None = None
    liger_glu_activation: bool | None = None
    liger_swiglu: bool | None = Field(default=None, description="older name of liger_glu_activation")
