"""Tiny local stand-ins for a hub model: a BPE tokenizer trained on the spot, a random
Llama saved with `save_pretrained`, an Alpaca .jsonl and an Axolotl YAML. No download.

Used by tests/integration/test_axolotl.py, in whichever venv pytest runs (it only needs
torch, tokenizers and transformers), and importable in Axolotl's venv too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

PLUGIN = "dft_peft.integrations.axolotl.DFTPlugin"
RECORDER = "axolotl_recorder.FirstStepRecorder"

_WORDS = (
    "add subtract multiply divide number sum total apples pears coins each box boxes "
    "how many left right there are has gives takes buys sells half double twice three "
    "four five six seven eight nine ten answer is the a of and to in for with so"
).split()


def alpaca_rows(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """Small arithmetic-flavoured Alpaca rows of varied length (so packing has work to do)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        filler = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 14)))
        rows.append(
            {
                "instruction": f"Tom has {a} apples and buys {b} more. {filler}. How many apples now?",
                "input": "" if i % 3 else f"apples: {a}, more: {b}",
                "output": f"Tom has {a} + {b} = {a + b} apples. The answer is {a + b}.",
            }
        )
    return rows


def write_alpaca(path: Path, rows: list[dict[str, str]] | None = None) -> Path:
    rows = alpaca_rows() if rows is None else rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(out_dir: Path, vocab_size: int = 320):
    """A byte-level BPE trained on the Alpaca rows plus the prompt template, Llama-style
    specials (`<s>` prepended, `</s>` end of text), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for r in alpaca_rows(200, seed=1) + alpaca_rows():
        texts.append(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n"
            f"### Response:\n{r['output']}"
        )
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, seed: int = 0, head_scale: float = 8.0) -> Path:
    """Tokenizer + random Llama (hidden 64, 2 layers, 4 heads) in `out_dir`, fp32 safetensors."""
    return save_random_llama(out_dir, build_tokenizer(out_dir), seed=seed, head_scale=head_scale)


def save_random_llama(
    out_dir: Path,
    tokenizer,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    max_position_embeddings: int = 512,
    head_scale: float = 8.0,
) -> Path:
    """A random 2-layer Llama for `tokenizer`, saved in `out_dir` as a user's model folder is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init predicts near-uniformly (p ~ 1/V everywhere); a larger head spreads the
    # target probabilities so DFT's sg(p) weighting is visibly different from CE.
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def axolotl_config(
    model_dir: Path,
    data_path: Path,
    output_dir: Path,
    *,
    plugins: list[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A CPU/fp32 LoRA config for the tiny model; deterministic data order."""
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "plugins": [PLUGIN] if plugins is None else plugins,
        "loss": "dft",
        "datasets": [{"path": str(data_path), "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(output_dir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(output_dir / "out"),
        "sequence_len": 256,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 1e-3,
        "train_on_inputs": False,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "eager",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        "shuffle_merged_datasets": False,
        "curriculum_sampling": True,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "use_wandb": False,
        "use_tensorboard": False,
        "strict": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
