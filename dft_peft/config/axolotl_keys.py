"""Axolotl's key names, sorted by what dft-peft does with them.

Pure data, kept apart from the schema in `config.py`: these lists follow Axolotl's schema
(`axolotl/utils/schemas/*.py`, 0.19) and change when Axolotl does, the schema when we do.
"""

from __future__ import annotations

# Chat template names Axolotl knows (schemas/enums.py ChatTemplate), plus
# `tokenizer_default_fallback_<name>`. Whether a name renders is the data layer's business; here
# we only catch typos.
CHAT_TEMPLATES = frozenset(
    {
        "alpaca", "chatml", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken",
        "gemma", "gemma3", "cohere", "llama3", "llama3_2_vision", "llama4", "phi_3", "phi_35",
        "deepseek_v2", "deepseek_v3", "jamba", "jinja", "qwen_25", "qwen3", "tokenizer_default",
        "exaone", "metharme", "pixtral", "llava", "qwen2_vl",
    }
)

# Axolotl keys that do not change what dft-peft trains (launcher bookkeeping, worker counts,
# Axolotl-internal flags): accepted whatever their value and listed by `describe()`.
AXOLOTL_HARMLESS_KEYS = frozenset(
    {
        "hf_use_auth_token", "local_rank", "world_size", "axolotl_config_path",
        "is_falcon_derived_model", "is_llama_derived_model", "is_mistral_derived_model",
        "is_qwen_derived_model", "dataset_processes", "dataset_num_proc", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_prefetch_factor", "include_tokens_per_second",
        "include_tkps", "eval_table_size", "eval_max_new_tokens", "gc_steps", "low_cpu_mem_usage",
        "experimental_skip_move_to_device", "tokenizer_save_jinja_files", "tokenizer_use_fast",
        "merge_method", "loraplus_lr_embedding", "sample_packing_group_size",
        "sample_packing_bin_size", "pretrain_multipack_attn", "pretrain_multipack_buffer_size",
        "streaming_multipack_buffer_size", "mean_resizing_embeddings", "shuffle_merged_datasets",
        "is_preprocess", "preprocess_iterable", "total_num_tokens", "total_supervised_tokens",
        "sample_packing_eff_est",
    }
)

# Real Axolotl keys dft-peft does not implement. Set to something other than empty/off they are
# an error (or, with `strict: false`, a warning) because ignoring them would change the run.
AXOLOTL_UNSUPPORTED_KEYS = frozenset(
    {
        # distributed / launchers
        "deepspeed", "deepcompile", "fsdp", "fsdp_config", "fsdp_version",
        "fsdp_final_state_dict_type", "ddp", "device", "device_map", "max_memory",
        "gpu_memory_limit", "sequence_parallel_degree", "context_parallel_size", "heads_k_stride",
        "ring_attn_func", "tensor_parallel_size", "dp_shard_size", "dp_replicate_size",
        "use_ray", "accelerator_config",
        # RL / other trainers
        "rl", "trl", "vllm", "ebft", "rl_beta", "reward_model", "process_reward_model",
        "num_labels", "center_rewards_coefficient", "precompute_ref_log_probs", "max_prompt_len",
        "trainer_cls",
        # model loading variants
        "model_config", "model_kwargs", "overrides_of_model_config", "overrides_of_model_kwargs",
        "cls_model_config", "processor_type", "processor_kwargs", "tokenizer_legacy",
        "tokenizer_use_mistral_common", "model_quantization_config",
        "model_quantization_config_kwargs", "gptq", "use_kernels", "use_onebitllms",
        "reinit_weights", "rope_scaling", "qat", "quantization", "fp8",
        "fp8_enable_fsdp_float8_all_gather", "bfloat16", "float16", "float32",
        # PEFT variants
        "lora_fan_in_fan_out", "lora_target_parameters", "lora_on_cpu", "merge_lora",
        "qlora_sharded_model_loading", "loraplus_lr_ratio", "lora_mlp_kernel", "lora_qkv_kernel",
        "lora_o_kernel", "lora_embedding_kernel", "unfrozen_parameters", "freeze_mm_modules",
        # kernels / attention / memory tricks
        "xformers_attention", "s2_attention", "flex_attention", "flex_attn_compile_kwargs",
        "sage_attention", "flash_optimum", "gemma4_hybrid_attn_impl", "experts_implementation",
        "quantize_moe_experts", "llama4_linearized_experts", "chunked_cross_entropy",
        "chunked_cross_entropy_num_chunks", "cut_cross_entropy", "use_eaft", "eaft_alpha",
        "eaft_k", "tiled_mlp", "tiled_mlp_num_shards", "tiled_mlp_use_original_mlp",
        "scaling_softmax", "scaling_softmax_factor", "scaling_softmax_bias", "torch_compile",
        "torch_compile_backend", "torch_compile_mode", "activation_offloading",
        "layer_offloading", "batch_flattening", "neftune_noise_alpha", "noisy_embedding_alpha",
        # data
        "pretraining_dataset", "pretraining_sample_concatenation", "streaming",
        "skip_prepare_dataset", "dataset_shard_num", "dataset_shard_idx",
        "num_dataset_shards_to_save", "dataset_exact_deduplication", "dataset_keep_in_memory",
        "shuffle_before_merging_datasets", "push_dataset_to_hub", "eval_sample_packing",
        "sample_packing_sequentially", "sample_packing_mp_start_method", "curriculum_sampling",
        "multipack_real_batches", "pad_to_multiple_of", "eval_sequence_len", "min_sample_len",
        "max_packed_sequence_len", "group_by_length", "remove_unused_columns",
        "dataloader_drop_last", "chat_template_kwargs", "eot_tokens", "default_system_message",
        "added_tokens_overrides", "fix_untrained_tokens", "resize_token_embeddings_to_32x",
        "shrink_embeddings", "embeddings_skip_upcast", "image_size", "image_resize_algorithm",
        # training loop
        "batch_size", "eval_batch_size", "auto_find_batch_size", "embedding_lr",
        "embedding_lr_scale", "optim_args", "optim_target_modules", "torchdistx_path",
        "lr_scheduler_kwargs", "lr_quadratic_warmup", "cosine_min_lr_ratio",
        "cosine_constant_lr_ratio", "lr_div_factor", "lr_groups", "adam_epsilon2", "adam_beta3",
        "eval_strategy", "evaluation_strategy", "save_strategy", "save_first_step",
        "early_stopping_patience", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "save_only_model", "save_safetensors", "loss_watchdog_threshold",
        "loss_watchdog_patience", "profiler_steps", "profiler_steps_start",
        "do_causal_lm_eval", "eval_causal_lm_metrics", "do_bench_eval", "bench_dataset",
        "bench_split", "generate_samples", "num_generation_samples", "generation_max_new_tokens",
        "generation_temperature", "generation_top_p", "generation_top_k",
        "generation_prompt_ratio", "generation_do_sample", "dynamic_checkpoint", "debug",
        # hub / other trackers
        "hub_model_id", "hub_strategy", "hub_revision", "use_mlflow", "use_comet",
        "hf_mlflow_log_artifacts",
        # PoSE
        "use_pose", "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks",
    }
)
AXOLOTL_UNSUPPORTED_PREFIXES = (
    "unsloth_", "relora_", "lisa_", "ddp_", "fsdp_", "liger_", "peft_", "dpo_", "kto_", "orpo_",
    "simpo_", "cpo_", "rpo_", "grpo_", "mlflow_", "comet_", "gradio_", "ray_", "trackio_",
    "otel_", "jagged_restart_", "dion_", "qgalore_", "flash_attn_", "hub_", "resources_per_",
)

# Unsupported keys whose Axolotl default is true: true (not false) is their "unchanged" value.
# dft-peft always writes safetensors, so `save_safetensors: true` changes nothing.
DEFAULT_TRUE_KEYS = frozenset({"save_safetensors"})

UNSUPPORTED_HINTS = {
    "xformers_attention": "use `attn_implementation: sdpa` instead",
    "flex_attention": "use `attn_implementation: sdpa` instead",
    "sage_attention": "use `attn_implementation: sdpa` instead",
    "s2_attention": "use `attn_implementation: sdpa` instead",
    "batch_size": "set `micro_batch_size` and `gradient_accumulation_steps` instead",
    "eval_strategy": "use `eval_steps` or `evals_per_epoch` instead",
    "evaluation_strategy": "use `eval_steps` or `evals_per_epoch` instead",
    "save_strategy": "use `save_steps` or `saves_per_epoch` instead",
    "model_quantization_config": "use `load_in_4bit: true` or `load_in_8bit: true` instead",
    "rl": "dft-peft does supervised fine-tuning; pick the objective with `loss:`",
    "deepspeed": "dft-peft trains on one device",
    "fsdp": "dft-peft trains on one device",
    "fsdp_config": "dft-peft trains on one device",
}
