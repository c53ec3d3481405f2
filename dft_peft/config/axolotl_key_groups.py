"""What dft-peft does with each Axolotl key it does not implement as a field, kept by hand.

Split out of `axolotl_keys.py` (which reads the generated table and re-exports these names) so
that each file stays readable: here are only the two hand-written tables, `harmless` (accepted,
with the reason `validate` prints) and `refused` (an error unless off, with its reason), and the
hint that says what to do instead. See `axolotl_keys.py` for the categories' meaning.
"""

from __future__ import annotations


def by_reason(groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{reason: keys} -> {key: reason}; a key listed twice is a bug in this table."""
    out: dict[str, str] = {}
    for reason, keys in groups.items():
        for key in keys:
            assert key not in out, f"{key} categorised twice"
            out[key] = reason
    return out


# ----------------------------------------------------------------------------- harmless

HARMLESS_KEYS = by_reason(
    {
        "launcher and preprocessing bookkeeping, no effect on the run": (
            "axolotl_config_path", "local_rank", "world_size", "is_preprocess",
            "hf_use_auth_token", "is_falcon_derived_model", "is_llama_derived_model",
            "is_mistral_derived_model", "is_qwen_derived_model", "total_num_tokens",
            "total_supervised_tokens", "sample_packing_eff_est", "experimental_skip_move_to_device",
            "low_cpu_mem_usage", "tokenizer_save_jinja_files",
        ),
        "worker counts and memory housekeeping: speed, not results": (
            "dataset_processes", "dataset_num_proc", "dataloader_num_workers",
            "dataloader_pin_memory", "dataloader_prefetch_factor", "dataset_keep_in_memory",
            "preprocess_iterable", "gc_steps", "gc_collect_steps", "torch_empty_cache_steps",
        ),
        "logging detail only": (
            "include_tokens_per_second", "include_tkps", "eval_table_size", "eval_max_new_tokens",
        ),
        "Axolotl's packing internals (bin sizes, worker start method); dft-peft packs its own way, "
        "with the same sequences per row": (
            "sample_packing_group_size", "sample_packing_bin_size", "pretrain_multipack_attn",
            "pretrain_multipack_buffer_size", "streaming_multipack_buffer_size",
            "sample_packing_mp_start_method",
        ),
        "evaluation rows are packed exactly when training rows are; the eval loss is the same "
        "per-token mean either way": ("eval_sample_packing",),
        "dft-peft tokenizes once before training either way; this says when, not what": (
            "skip_prepare_dataset",
        ),
        "order only: the trainer shuffles the merged training rows with `seed` anyway": (
            "shuffle_merged_datasets", "shuffle_before_merging_datasets",
        ),
        "used by `axolotl merge-lora` after training, not by training": ("merge_method",),
        "generation metrics (sacrebleu, comet, ter, chrf, perplexity) dft-peft does not compute at "
        "eval; the eval loss is still logged and training is the same": ("do_causal_lm_eval", "eval_causal_lm_metrics"),
        "a tracker dft-peft does not log to (it logs to tensorboard and wandb via `report_to`): logging only, the run is the same": (
            "use_mlflow", "hf_mlflow_log_artifacts", "mlflow_experiment_name", "mlflow_run_name",
            "mlflow_tracking_uri", "use_comet", "comet_api_key", "comet_experiment_config",
            "comet_experiment_key", "comet_mode", "comet_online", "comet_project_name",
            "comet_workspace", "use_otel_metrics", "otel_metrics_host", "otel_metrics_port",
            "use_trackio", "trackio_project_name", "trackio_run_name", "trackio_space_id",
            "use_swanlab", "swanlab_api_host", "swanlab_api_key", "swanlab_completion_log_interval",
            "swanlab_completion_max_buffer", "swanlab_description", "swanlab_experiment_name",
            "swanlab_lark_secret", "swanlab_lark_webhook_url", "swanlab_log_completions",
            "swanlab_log_model", "swanlab_mode", "swanlab_project", "swanlab_web_host",
            "swanlab_workspace",
        ),
        "kernels that compute the same layers faster (Axolotl's Triton LoRA kernels, the hub's, "
        "the fused RMSNorm+RoPE kernel, the ScatterMoE/SonicMoE experts kernels, flex attention's "
        "compile settings); dft-peft runs peft's LoRA layers and the model's own code": (
            "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel", "use_kernels",
            "flex_attn_compile_kwargs", "fused_attn_kernel", "use_scattermoe", "use_sonicmoe",
        ),
        "Inductor tuning flags (autotuning, padding, CUDA graphs): speed only; with "
        "`torch_compile: true` dft-peft compiles with Inductor's defaults": ("torch_compile_options",),
        "dft-peft loads no GPTQ model (older Axolotl key)": ("gptq_disable_exllama",),
        "only read together with `loraplus_lr_ratio`": ("loraplus_lr_embedding",),
        "new token embeddings are initialised by transformers' resize either way": (
            "mean_resizing_embeddings",
        ),
        "the fast and slow tokenizers give the same ids; dft-peft uses the fast one": (
            "tokenizer_use_fast",
        ),
        "settings of Axolotl's Gradio inference UI, not used in training": (
            "gradio_max_new_tokens", "gradio_server_name", "gradio_server_port", "gradio_share",
            "gradio_temperature", "gradio_title",
        ),
        "dft-peft's fused loss already computes the objective chunk by chunk from the hidden "
        "states without building the full logits (what this kernel is for)": (
            "cut_cross_entropy", "chunked_cross_entropy", "chunked_cross_entropy_num_chunks",
            "liger_cross_entropy", "liger_fused_linear_cross_entropy", "flash_attn_cross_entropy",
        ),
        "a kernel choice for Liger; dft-peft applies Liger's default kernels": (
            "liger_kernel_impl", "liger_rms_norm_gated",
        ),
        "removed from Axolotl before 0.19, which ignores it as well": (
            "gptq_groupsize", "gptq_model_v1", "xpos_rope", "landmark_attention",
            "flash_attn_fuse_qkv", "debug", "unsloth_cross_entropy_loss", "unsloth_lora_mlp",
            "unsloth_lora_qkv", "unsloth_lora_o", "unsloth_rms_norm", "unsloth_rope",
        ),
    }
)

# ----------------------------------------------------------------------------- refused

REFUSED_KEYS = by_reason(
    {
        "Axolotl 0.19 refuses it too (\"no longer supported\", axolotl/utils/schemas/deprecated.py)": (
            "flash_attn_rms_norm",
        ),
        "Gemma 4's hybrid attention runs as sdpa here, which needs `attn_implementation` unset, "
        "flash_attention_2 or sdpa (Axolotl refuses another choice too)": ("gemma4_hybrid_attn_impl",),
        "dft-peft trains on one device per process (DDP through torchrun/accelerate, or "
        "DeepSpeed ZeRO 0-2 with `deepspeed:`)": (
            "deepcompile", "fsdp", "fsdp_final_state_dict_type",
            "ddp", "ddp_broadcast_buffers", "ddp_bucket_cap_mb",
            "ddp_timeout", "device", "device_map", "max_memory",
            "gpu_memory_limit", "sequence_parallel_degree", "context_parallel_size",
            "heads_k_stride", "ring_attn_func", "tensor_parallel_size", "dp_shard_size",
            "dp_replicate_size", "accelerator_config", "fp8_enable_fsdp_float8_all_gather",
            "use_ray", "ray_num_workers", "ray_run_name", "resources_per_worker",
            "expert_parallel_backend", "expert_parallel_fallback_on_unsupported",
            "expert_parallel_num_nvl_bytes", "expert_parallel_num_rdma_bytes",
            "expert_parallel_size", "expert_parallel_token_capacity",
        ),
        "dft-peft does supervised fine-tuning; choose the objective with `loss:` (RL, reward "
        "models and preference training are out of scope)": (
            "rl", "trl", "vllm", "ebft", "rl_beta", "reward_model", "process_reward_model",
            "num_labels", "center_rewards_coefficient", "precompute_ref_log_probs",
            "max_prompt_len", "cpo_alpha", "dpo_beta", "dpo_generate_during_eval",
            "dpo_label_smoothing", "dpo_loss_type", "dpo_loss_weights", "dpo_norm_loss",
            "dpo_padding_free", "dpo_use_liger_kernel", "dpo_use_logits_to_keep",
            "dpo_use_weighting", "kto_desirable_weight", "kto_undesirable_weight", "orpo_alpha",
            "rpo_alpha", "simpo_gamma", "nemo_gym_auto_clone", "nemo_gym_auto_start",
            "nemo_gym_config_paths", "nemo_gym_datasets", "nemo_gym_dir", "nemo_gym_enabled",
            "nemo_gym_head_port", "nemo_gym_max_turns", "nemo_gym_model_name",
            "nemo_gym_multi_turn", "nemo_gym_run_timeout", "nemo_gym_server_timeout",
            "nemo_gym_verify_timeout",
        ),
        "another training objective or trainer than the `loss:` dft-peft computes": (
            "trainer_cls", "neftune_noise_alpha",
            "noisy_embedding_alpha", "kd_alpha", "kd_beta", "kd_ce_alpha", "kd_normalize_topk",
            "kd_online_server", "kd_online_server_base_url", "kd_online_timeout",
            "kd_online_topk", "kd_temperature", "kd_temperature_min", "kd_trainer", "diffusion",
            "liger_use_token_scaling", "grokfast_alpha", "grokfast_lamb", "scaling_softmax",
            "scaling_softmax_factor", "scaling_softmax_bias",
        ),
        "a model-loading variant dft-peft does not implement (it would load another model)": (
            "overrides_of_model_kwargs", "cls_model_config",
            "gptq", "use_onebitllms",
            "reinit_weights", "rope_scaling", "qat", "quantization", "fp8", "fp8_config",
            "float32", "fp32_norms", "fp32_norm_classes",
            "llmcompressor", "dense_mixer", "hatchery",
        ),
        "multimodal models are out of scope (dft-peft trains causal text models)": (
            "processor_type", "processor_kwargs", "image_size", "image_resize_algorithm",
            "role_boundaries", "freeze_mm_modules",
        ),
        "a PEFT variant dft-peft does not implement (another adapter than plain LoRA)": (
            "peft_use_dora", "peft_init_lora_weights", "peft_layer_replication",
            "peft_layers_pattern", "peft_layers_to_transform", "peft_trainable_token_indices",
            "peft_autocast_adapter_dtype", "peft_ensure_weight_tying", "lora_alpha_pattern",
            "lora_rank_pattern", "lora_on_cpu", "merge_lora",
            "qlora_sharded_model_loading", "loraplus_lr_ratio", "mora", "lisa_n_layers",
            "lisa_step_interval", "lisa_layers_attribute", "spectrum_model_name",
            "spectrum_top_fraction",
        ),
        "an older Axolotl's ReLoRA key; Axolotl 0.19 (and dft-peft) call it `jagged_restart_steps`, "
        "`jagged_restart_warmup_steps`, `jagged_restart_anneal_steps`": ("relora_steps", "relora_warmup_steps", "relora_anneal_steps"),
        "with an adapter, Axolotl freezes every parameter its patterns miss (the LoRA weights "
        "too: it matches the PEFT-wrapped names) and PEFT then saves only the adapter, so base "
        "weights trained this way are lost": ("unfrozen_parameters",),
        "a fused or custom kernel dft-peft does not apply; its numerics differ from the "
        "model's own code": (
            "xformers_attention", "s2_attention", "sage_attention",
            "flash_optimum", "flash_attn_fuse_mlp", "flash_attn_d512",
            "large_head_attention", "sdpa_varlen",
            "tiled_mlp_use_original_mlp", "layer_offloading", "ple_cpu_offload", "batch_flattening",
            "selective_checkpointing", "dynamic_checkpoint", "dsv4_bf16_all",
            "dsv4_fp8_lora_kernel", "dsv4_fp8_nonexpert_mode",
            "dsv4_shared_mlp_lora_kernel", "expert_backend", "gemma4_fp8_nonexpert",
            "gemma4_nf4_nonexpert", "moe_bnb_fast", "moe_dequant_chunk_size",
            "moe_grouped_backend", "nonexpert_quantization", "use_glm_dsa_kernels",
        ),
        "Axolotl's kernels for checkpoints stored in NVFP4, which only they load and train, on a "
        "Blackwell GPU (sm100+); transformers cannot load such checkpoints yet. Use the model's bf16 "
        "release with `load_in_4bit: true` (and `quantize_moe_experts: true` for a MoE)": (
            "nvfp4_merge_aware", "nvfp4_merge_aware_start_step", "use_dsv4_kernels", "dsv4_fp4_grouped_mode",
        ),
        "changes which rows or tokens are trained on": (
            "pretraining_dataset", "pretraining_sample_concatenation", "streaming",
            "dataset_shard_num", "dataset_shard_idx", "num_dataset_shards_to_save",
            "sample_packing_sequentially", "curriculum_sampling",
            "multipack_real_batches", "pad_to_multiple_of", "eval_sequence_len", "min_sample_len",
            "max_packed_sequence_len", "group_by_length", "remove_unused_columns",
            "dataloader_drop_last", "chat_template_kwargs", "default_system_message",
            "added_tokens_overrides", "fix_untrained_tokens",
            "shrink_embeddings", "embeddings_skip_upcast", "use_pose", "pose_split_on_token_ids",
            "pose_max_context_len", "pose_num_chunks", "push_dataset_to_hub",
        ),
        "a training-loop setting dft-peft does not implement (it changes the optimisation)": (
            "auto_find_batch_size", "embedding_lr",
            "embedding_lr_scale", "optim_args", "optim_target_modules", "torchdistx_path",
            "lr_scheduler_kwargs", "cosine_min_lr_ratio",
            "cosine_constant_lr_ratio", "lr_div_factor", "lr_groups", "adam_epsilon2",
            "adam_beta3", "dion_lr", "dion_momentum", "dion_rank_fraction",
            "dion_rank_multiple_of", "qgalore_cos_threshold", "qgalore_gamma_proj",
            "qgalore_proj_bits", "qgalore_proj_group_size", "qgalore_proj_quant",
            "qgalore_proj_type", "qgalore_queue_size", "qgalore_rank", "qgalore_scale",
            "qgalore_update_proj_gap",
        ),
        "a checkpoint, evaluation or output dft-peft does not produce": (
            "eval_strategy", "evaluation_strategy", "save_strategy", "save_first_step",
            "save_only_model", "save_safetensors", "profiler_steps", "profiler_steps_start",
            "do_bench_eval", "bench_dataset",
            "bench_split", "generate_samples", "num_generation_samples",
            "generation_max_new_tokens", "generation_temperature", "generation_top_p",
            "generation_top_k", "generation_prompt_ratio", "generation_do_sample",
            "hub_model_id", "hub_strategy", "hub_revision", "lm_eval_batch_size",
            "lm_eval_model", "lm_eval_post_train", "lm_eval_tasks",
        ),
    }
)

# What to do instead, where there is a dft-peft key for it.
REFUSED_HINTS = {
    "xformers_attention": "use `attn_implementation: sdpa` instead",
    "sage_attention": "use `attn_implementation: sdpa` instead",
    "s2_attention": "use `attn_implementation: sdpa` instead",
    "eval_strategy": "use `eval_steps` or `evals_per_epoch` instead",
    "evaluation_strategy": "use `eval_steps` or `evals_per_epoch` instead",
    "save_strategy": "use `save_steps` or `saves_per_epoch` instead",
    "rl": "dft-peft does supervised fine-tuning; pick the objective with `loss:`",
    "fsdp": "use `fsdp_version: 2` with an `fsdp_config:` block instead",
    "unfrozen_parameters": "use `lora_modules_to_save` to train whole modules (saved with the adapter)",
}
