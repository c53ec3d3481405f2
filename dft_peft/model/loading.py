"""Load the base model and tokenizer: precision, quantization, attention, and the model for
inference (base + trained adapter). `trust_remote_code` stays off unless the config asks for it;
where the files come from is `dft_peft.model.source`, the adapter `dft_peft.model.adapter`."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dft_peft.config.checks import check_model_config
from dft_peft.errors import UserError
from dft_peft.model import hub, llama4_experts, moe_quant, relora_weights
from dft_peft.model.loftq import loftq_anywhere
from dft_peft.model.prequantized import prequantized_config
from dft_peft.model.source import resolve_model_path

logger = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """What `bf16`/`fp16` resolve to on this machine."""

    bf16: bool
    fp16: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def resolve_precision(bf16: Any, fp16: Any) -> Precision:
    """`bf16: auto`: bf16 on a GPU that supports it, else fp16 on CUDA, else fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if bf16 == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return Precision(bf16=True, fp16=False)
        return Precision(bf16=False, fp16=cuda and fp16 is not False)
    if fp16 and not cuda:
        raise UserError("fp16: true needs a CUDA GPU; set `fp16: false` (CPU training runs in fp32) or `bf16: auto`.")
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("bf16: true but this GPU has no bf16 (e.g. a T4); set `bf16: false` and `fp16: true`, or `bf16: auto`.")
    return Precision(bf16=bool(bf16), fp16=bool(fp16))


def resolve_attention(requested: str | None) -> str | None:
    """flash_attention_2 only where flash-attn imports and the GPU is Ampere or newer; else sdpa.

    A Colab T4 user with `flash_attention: true` in a copied config gets a one-line warning and
    trains with sdpa instead of a crash.
    """
    if requested != "flash_attention_2":
        return requested
    from transformers.utils import is_flash_attn_2_available

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU"
    elif torch.cuda.get_device_capability()[0] < 8:
        reason = f"{torch.cuda.get_device_name()} is older than Ampere"
    elif not is_flash_attn_2_available():
        reason = "flash-attn is not installed (pip install 'dft-peft[flash-attn]')"
    if reason:
        warnings.warn(f"flash_attention_2 unavailable ({reason}); using sdpa.", stacklevel=2)
        return "sdpa"
    return requested


# ----------------------------------------------------------------------------- loading


def load_tokenizer(cfg: Any, model_path: Path):
    """The tokenizer, with a pad token (training pads) and the config's extra tokens."""
    from transformers import AutoTokenizer

    source = hub.local_source(cfg, "tokenizer_config") or model_path
    if getattr(cfg, "tokenizer_use_mistral_common", False):  # Axolotl's key: mistral-common's tokenizer
        from dft_peft.model.mistral_tokenizer import check_mistral_options, load_mistral_tokenizer

        check_mistral_options(cfg)
        return load_mistral_tokenizer(source)
    # Axolotl passes `tokenizer_legacy` as `legacy=` only when set (the tokenizer's own default else).
    legacy = {} if cfg.tokenizer_legacy is None else {"legacy": cfg.tokenizer_legacy}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **legacy)
    if cfg.special_tokens is not None:
        specials = {k: v for k, v in cfg.special_tokens.model_dump().items() if v is not None}
        tokenizer.add_special_tokens(specials)
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(cfg: Any, precision: Precision):
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=precision.dtype,
            # FSDP shards parameters of one dtype: 4-bit weights stored as the training dtype
            # (Axolotl does the same for QLoRA + FSDP). Untested here: needs several GPUs.
            **({"bnb_4bit_quant_storage": precision.dtype} if cfg.fsdp_config or cfg.fsdp_version else {}),
        )
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(cfg: Any, model_path: Path, tokenizer: Any, precision: Precision):
    """The base causal LM in the training dtype, quantized if asked, on the GPU if there is one."""
    import transformers

    auto_cls = getattr(transformers, cfg.model_type or "AutoModelForCausalLM", None)
    if auto_cls is None:
        raise UserError(f"model_type `{cfg.model_type}` is not a transformers class; use AutoModelForCausalLM.")
    kwargs: dict[str, Any] = {
        "dtype": precision.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "quantization_config": quantization_config(cfg, precision) or prequantized_config(cfg, model_path),
    }
    if cfg.base_model_config or cfg.overrides_of_model_config:
        kwargs["config"] = transformers.AutoConfig.from_pretrained(
            hub.local_source(cfg, "base_model_config") or model_path, trust_remote_code=cfg.trust_remote_code
        )
        for key, value in (cfg.overrides_of_model_config or {}).items():  # Axolotl's `model_config:`
            setattr(kwargs["config"], key, value)
    attention = resolve_attention(cfg.attn_implementation)
    if attention:
        kwargs["attn_implementation"] = attention
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    moe_quant.check_moe_quant(cfg)
    with moe_quant.quantizing_experts_on_load(cfg), llama4_experts.linearized_experts(cfg, model_path):
        model = auto_cls.from_pretrained(model_path, **kwargs)
    if getattr(cfg, "quantize_moe_experts", False):
        moe_quant.quantize_experts(model, cfg)  # any expert the loader did not set one by one
    if getattr(cfg, "experts_implementation", None):  # as Axolotl sets it: after loading, on the whole model
        if not hasattr(model, "set_experts_implementation"):
            raise UserError(f"experts_implementation: {type(model).__name__} has no experts kernels to choose; remove it.")
        model.set_experts_implementation(cfg.experts_implementation)
    rows = embedding_rows(len(tokenizer), cfg.resize_token_embeddings_to_32x)
    if rows > model.get_input_embeddings().weight.shape[0]:  # grown, never shrunk (as Axolotl)
        model.resize_token_embeddings(rows)
    model.config.use_cache = False  # training; generation turns it back on per call
    from dft_peft.model.liger import apply_liger_kernels

    apply_liger_kernels(model, cfg)  # liger_rms_norm, ...: same functions, fused kernels
    return model


def embedding_rows(tokens: int, to_32x: bool | None) -> int:
    """Rows the embeddings need for `tokens`: Axolotl's `resize_token_embeddings_to_32x` rounds up to
    a multiple of 32 (tensor-core friendly; the extra rows are never targets)."""
    return -(-tokens // 32) * 32 if to_32x else tokens


def load_model_config(cfg: Any, source: Any):
    """The model's config (no weights), with a model that ships its own code named as such and
    the config's limits (sequence_len vs. the position limit) checked before any loading."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(
            f"base_model `{cfg.base_model}` needs its own Python code (trust_remote_code); read that code, "
            "then set `trust_remote_code: true` if you trust it."
        ) from None
    check_model_config(cfg, config)
    return config


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n *= 2
        elif p.dtype == torch.uint8 and ".parametrizations." in name:  # 4-bit MoE experts (moe_quant)
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_for_inference(cfg: Any, adapter_dir: str | Path | None = None, *, quantize: bool = False):
    """(model, tokenizer) for generation, merging and evaluation: the base model in full
    precision (or quantized as configured when `quantize`), with the trained adapter if given.

    The tokenizer is taken from the adapter folder when it has one: training may have added tokens.
    """
    import peft

    precision = resolve_precision(cfg.bf16, False)
    model_path = resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file)
    if adapter_dir and not Path(adapter_dir, "adapter_config.json").is_file():  # before minutes of loading
        raise UserError(f"`{adapter_dir}` holds no adapter (adapter_config.json); train first or pass --adapter DIR.")
    tokenizer_source = adapter_dir if adapter_dir and Path(adapter_dir, "tokenizer_config.json").is_file() else None
    if tokenizer_source:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        tokenizer = load_tokenizer(cfg, model_path)
    if not quantize:
        update = {"load_in_4bit": False, "load_in_8bit": False}
        if "quantize_moe_experts" in type(cfg).model_fields:
            update["quantize_moe_experts"] = False
        cfg = cfg.model_copy(update=update)
    model = load_model(cfg, model_path, tokenizer, precision)
    if adapter_dir:
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise UserError(f"`{adapter_dir}` holds no adapter (adapter_config.json); train first or pass --adapter DIR.")
        with loftq_anywhere():  # a LoftQ adapter: peft quantizes the base again, as in training
            model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
        merged_base = Path(adapter_dir, relora_weights.BASE_WEIGHTS)
        if merged_base.is_file():  # a ReLoRA run: the base weights its restarts merged into
            relora_weights.load_base_weights(model, merged_base)
    model.config.use_cache = True
    return model.eval(), tokenizer
