"""Config audit: a field that a run would accept and then not use (for its model type, device or
layout), a value no code path knows, or a contradictory pair is one ConfigError line naming the
field, before anything is built. One test per finding; each composes configs as train.py does."""
import pytest

from framework.cli import register_resolvers
from framework.config import ConfigError, register_configs
from helpers import config_error, load_config

register_configs()
register_resolvers()


def world_error(cfg, world_size: int, on_gpu: bool) -> str:
    """The one-line ConfigError of `cfg.resolve_world(world_size, on_gpu)` (what make_plan runs
    before any worker starts)."""
    with pytest.raises(ConfigError) as e:
        cfg.resolve_world(world_size, on_gpu=on_gpu)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- model.cudnn_attention=true where SDPAttention never reaches cuDNN -------------------------
def test_cudnn_attention_with_local_attention_is_an_error():
    msg = config_error("model.cudnn_attention=true", "model.attention_backend=local")
    assert "model.cudnn_attention=true" in msg and "model.attention_backend=local" in msg


def test_cudnn_attention_on_bert_is_an_error():
    msg = config_error("model=bert_tiny", "model.cudnn_attention=true")
    assert "model.cudnn_attention=true" in msg and "model.type=bert" in msg


def test_cudnn_attention_with_relative_position_bias_is_an_error():
    msg = config_error("model=t5_tiny", "model.cudnn_attention=true")
    assert "model.cudnn_attention=true" in msg and "relative" in msg
    # T5's causal decoder self-attention takes it without the bias
    load_config("model=t5_tiny", "model.position_embedding_type=rope",
                "model.cudnn_attention=true")


def test_cudnn_attention_head_dim_outside_cudnn_is_an_error():
    msg = config_error("model.cudnn_attention=true", "model.kv_channels=12")
    assert "model.cudnn_attention=true" in msg and "head dim 12" in msg
    assert "head dim 256" in config_error("model.cudnn_attention=true", "model.kv_channels=256")


def test_cudnn_attention_with_cuda_graph_true_is_an_error():
    msg = config_error("model.cudnn_attention=true", "model.cuda_graph=true")
    assert "model.cudnn_attention=true" in msg and "model.cuda_graph=true" in msg


def test_cuda_graph_null_stays_off_with_cudnn_attention():
    """cuda_graph=null turns graphs on with train.fp8 on one GPU; an explicit
    cudnn_attention=true would then never run, so null resolves off there."""
    fp8 = ("train.fp8=tensorwise", "train.micro_batch_size=16", "train.global_batch_size=16")
    cfg = load_config(*fp8, "model.cudnn_attention=true")
    cfg.resolve_world(1, on_gpu=True)
    assert cfg.model.cuda_graph is False
    cfg = load_config(*fp8)
    cfg.resolve_world(1, on_gpu=True)
    assert cfg.model.cuda_graph is True


def test_cudnn_attention_in_fp32_on_gpu_is_an_error():
    cfg = load_config("model.cudnn_attention=true", "train.bf16=false")
    msg = world_error(cfg, 1, on_gpu=True)
    assert "model.cudnn_attention=true" in msg and "train.bf16=false" in msg
    load_config("model.cudnn_attention=true").resolve_world(1, on_gpu=True)


# ---- ALiBi kernel settings -----------------------------------------------------------------
def test_alibi_kernel_without_alibi_is_an_error():
    msg = config_error("model.alibi_kernel=cudnn")
    assert "model.alibi_kernel=cudnn" in msg and "position_embedding_type=alibi" in msg
    load_config("model.alibi_kernel=dense")  # the reference: what non-ALiBi attention runs


def test_flex_kernel_options_without_alibi_is_an_error():
    msg = config_error("model.flex_kernel_options={BLOCK_M:64}")
    assert "model.flex_kernel_options" in msg and "position_embedding_type=alibi" in msg


def test_flex_kernel_options_override_as_the_readme_writes_it():
    """`model.flex_kernel_options={...}` (README) used to fail as an unknown config key."""
    cfg = load_config("model.position_embedding_type=alibi",
                      "model.flex_kernel_options={BLOCK_M:64,num_warps:4}")
    assert cfg.model.flex_kernel_options == {"BLOCK_M": 64, "num_warps": 4}
    with pytest.raises(Exception, match="bogus"):  # the rest of the model group stays strict
        load_config("model.bogus=1")


def test_alibi_flex_with_dropout_or_odd_head_dim_is_an_error():
    alibi = ("model.position_embedding_type=alibi", "model.alibi_kernel=flex")
    msg = config_error(*alibi, "model.attention_dropout=0.1")
    assert "model.alibi_kernel=flex" in msg and "model.attention_dropout=0.1" in msg
    assert "head dim 24" in config_error(*alibi, "model.kv_channels=24")
    load_config(*alibi)


def test_alibi_cudnn_contradicts_cudnn_attention_false():
    msg = config_error("model.position_embedding_type=alibi", "model.alibi_kernel=cudnn",
                       "model.cudnn_attention=false")
    assert "model.alibi_kernel=cudnn" in msg and "model.cudnn_attention=false" in msg


@pytest.mark.parametrize("kernel", ["cudnn", "flex"])
def test_gpu_alibi_kernels_on_cpu_are_an_error(kernel):
    cfg = load_config("model.position_embedding_type=alibi", f"model.alibi_kernel={kernel}")
    msg = world_error(cfg, 1, on_gpu=False)
    assert f"model.alibi_kernel={kernel}" in msg and "`model.alibi_kernel=auto`" in msg
    cfg.resolve_world(1, on_gpu=True)


# ---- switches a model family never reads -----------------------------------------------------
def test_torch_compile_reaches_bert_and_t5():
    # build_model compiles the layers of every stack (encoder and decoder), so encoder models
    # take the switch too (tests/test_gpu_bert_t5.py trains them compiled)
    load_config("model=bert_tiny", "model.torch_compile=true")
    load_config("model=t5_tiny", "model.torch_compile=true")


def test_rotary_percent_without_rope_is_an_error():
    msg = config_error("model=gpt_tiny", "model.position_embedding_type=learned_absolute",
                       "model.rotary_percent=0.5")
    assert "model.rotary_percent=0.5" in msg and "rope" in msg


def test_overlap_p2p_comm_without_pipeline_is_an_error():
    msg = config_error("model=gpt_tiny", "parallel.overlap_p2p_comm=true")
    assert "parallel.overlap_p2p_comm=true" in msg and "pipeline_model_parallel_size" in msg


@pytest.mark.parametrize("model", ["bert_tiny", "t5_tiny"])
def test_rope_scaling_outside_gpt_is_an_error(model):
    msg = config_error(f"model={model}", "model.position_embedding_type=rope",
                       "model.rope_scaling=true")
    assert "model.rope_scaling=true" in msg and model.split("_")[0] in msg


def test_rotary_base_outside_gpt_rope_is_an_error():
    msg = config_error("model=bert_tiny", "model.position_embedding_type=rope",
                       "model.rotary_base=500000")
    assert "model.rotary_base=500000" in msg and "model.type=bert" in msg
    msg = config_error("model=gpt2_small", "model.rotary_base=500000")
    assert "model.rotary_base=500000" in msg and "learned_absolute" in msg
    load_config("model.rotary_base=500000")  # gpt_tiny: GPT with RoPE


# ---- recompute fields ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["parallel.recompute_method=uniform",
                                      "parallel.recompute_num_layers=2"])
def test_recompute_method_and_layers_need_full_granularity(override):
    for granularity in ([], ["parallel.recompute_granularity=selective"]):
        msg = config_error(override, *granularity)
        assert override in msg and "recompute_granularity=full" in msg


def test_recompute_method_unknown_value_is_an_error():
    assert "parallel.recompute_method='blocks'" in config_error(
        "parallel.recompute_method=blocks")


def test_recompute_modules_need_selective_granularity():
    msg = config_error("parallel.recompute_modules=[mlp_act]")
    assert "parallel.recompute_modules=['mlp_act']" in msg and "selective" in msg
    load_config("parallel.recompute_granularity=selective", "parallel.recompute_modules=[mlp_act]")


def test_recompute_num_layers_beyond_a_stage_is_an_error():
    """recompute_num_layers=100 on a 4-layer model was taken as it was."""
    full = ("parallel.recompute_granularity=full", "parallel.recompute_method=uniform")
    msg = config_error(*full, "parallel.recompute_num_layers=100")
    assert msg == ("parallel.recompute_num_layers=100 is more than the 4 layers a pipeline stage "
                   "holds (4 layers / parallel.pipeline_model_parallel_size=1)"), msg
    load_config(*full, "parallel.recompute_num_layers=4")


def test_recompute_on_cpu_is_one_line(tmp_path):
    """Any activation recompute on the CPU failed at the first step with megatron-core's
    "Torch not compiled with CUDA enabled" traceback (it saves the CUDA RNG state)."""
    from helpers import run_train

    r = run_train("parallel.recompute_granularity=selective", cwd=tmp_path, expect=2)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: parallel.recompute_granularity=selective needs a GPU (megatron-core's "
                     "recompute saves and restores the CUDA RNG state); a CPU run trains without "
                     "it: `parallel.recompute_granularity=null` works here"], r.stderr[-2000:]


def test_selective_recompute_with_no_modules_is_an_error():
    msg = config_error("parallel.recompute_granularity=selective", "parallel.recompute_modules=[]")
    assert "parallel.recompute_granularity=selective" in msg
    assert "parallel.recompute_modules" in msg


# ---- parallel / run fields -------------------------------------------------------------------
def test_distributed_backend_unknown_value_is_an_error():
    assert "parallel.distributed_backend='ncll'" in config_error(
        "parallel.distributed_backend=ncll")
    load_config("parallel.distributed_backend=gloo")


def test_overlap_grad_reduce_on_cpu_is_an_error():
    cfg = load_config("parallel.overlap_grad_reduce=true")
    msg = world_error(cfg, 1, on_gpu=False)
    assert "parallel.overlap_grad_reduce=true" in msg
    assert "`parallel.overlap_grad_reduce=false`" in msg
    cfg.resolve_world(1, on_gpu=True)


def test_profile_steps_after_max_steps_is_an_error():
    msg = config_error("train.max_steps=10", "train.profile.steps=[11,12]")
    assert "train.profile.steps=[11, 12]" in msg and "train.max_steps=10" in msg
    load_config("train.max_steps=10", "train.profile.steps=[9,12]")


def test_profile_ranks_outside_the_world_is_an_error():
    two = ("train.micro_batch_size=16", "train.global_batch_size=32")  # DP 2
    cfg = load_config(*two, "train.profile.steps=[1,2]", "train.profile.ranks=[2,3]")
    msg = world_error(cfg, 2, on_gpu=True)
    assert "train.profile.ranks=[2, 3]" in msg
    cfg = load_config(*two, "train.profile.steps=[1,2]", "train.profile.ranks=[1,3]")
    cfg.resolve_world(2, on_gpu=True)


def test_a_checkpoint_saved_before_a_check_still_loads():
    """The settings-used checks apply to configs composed for a run, not to the model config a
    checkpoint stored: one written before a check existed (here ALiBi's flex kernel with
    dropout, which training then ran with the dense bias) still loads; a new run with it is
    refused."""
    from dataclasses import asdict

    from framework.checkpoint.reader import stored_model_config
    from framework.config import ModelConfig

    old = asdict(ModelConfig(position_embedding_type="alibi", attention_dropout=0.1))
    old["alibi_kernel"] = "flex"  # refused for new runs since 2026-12-04
    got = stored_model_config({"config": {"model": old}})
    assert got.alibi_kernel == "flex" and got.attention_dropout == 0.1
    msg = config_error("model=gpt_tiny", "model.position_embedding_type=alibi",
                       "model.alibi_kernel=flex", "model.attention_dropout=0.1")
    assert "model.alibi_kernel=flex" in msg


def test_random_data_refuses_document_settings():
    msg = config_error("model=gpt_tiny", "data=random", "data.eod_mask_loss=true")
    assert "data.eod_mask_loss" in msg and "data=random" in msg
    msg = config_error("model=gpt_tiny", "data=random", "data.path=[x]")
    assert "data.path" in msg
    load_config("model=gpt_tiny", "data=random")


def test_empty_recompute_modules_without_recompute_is_fine():
    load_config("model=gpt_tiny", "parallel.recompute_modules=[]")


def test_qkv_rope_fusion_needs_a_kv_group_per_tp_rank():
    msg = config_error("model=llama_tiny", "model.qkv_rope_fusion=true",
                       "model.num_query_groups=1", "parallel=tp2")
    assert "model.qkv_rope_fusion=true" in msg and "num_query_groups=1" in msg


# ---- optimizer fields the chosen optimizer, precision or schedule never reads ----------------
def test_settings_of_the_other_optimizer_are_an_error():
    msg = config_error("optimizer=sgd", "optimizer.adam_beta2=0.999")
    assert "optimizer.adam_beta2=0.999" in msg and "optimizer.optimizer=sgd" in msg
    msg = config_error("optimizer.sgd_momentum=0.5")
    assert "optimizer.sgd_momentum=0.5" in msg and "optimizer.optimizer=adam" in msg
    load_config("optimizer=sgd", "optimizer.sgd_momentum=0.5")
    load_config("optimizer.adam_beta2=0.999")


def test_dynamic_loss_scale_fields_need_fp16_without_static_scale():
    msg = config_error("optimizer.hysteresis=4")
    assert "optimizer.hysteresis=4" in msg and "train.fp16=false" in msg
    msg = config_error("train.fp16=true", "optimizer.loss_scale=128",
                       "optimizer.loss_scale_window=50")
    assert "optimizer.loss_scale_window=50" in msg and "optimizer.loss_scale=128" in msg
    load_config("train.fp16=true", "optimizer.hysteresis=4", "optimizer.loss_scale_window=5")


def test_static_loss_scale_in_an_fp32_run_is_an_error():
    msg = world_error(load_config("optimizer.loss_scale=128"), 1, on_gpu=False)
    assert "optimizer.loss_scale=128" in msg and "CPU" in msg
    msg = world_error(load_config("optimizer.loss_scale=128", "train.bf16=false"), 1,
                      on_gpu=True)
    assert "optimizer.loss_scale=128" in msg and "train.bf16=false" in msg
    load_config("optimizer.loss_scale=128").resolve_world(1, on_gpu=True)  # bf16: mcore scales


def test_lr_decay_steps_with_constant_lr_is_an_error():
    msg = config_error("optimizer.lr_decay_style=constant", "optimizer.lr_decay_steps=100")
    assert "optimizer.lr_decay_steps=100" in msg and "constant" in msg
    load_config("optimizer.lr_decay_style=linear", "optimizer.lr_decay_steps=100")


# ---- data fields the data type or the model family's samples never read ----------------------
@pytest.mark.parametrize("data,override", [
    ("embedded", "data.path=[corpus]"),
    ("mock", "data.split='90,10,0'"),
    ("mock", "data.num_documents=500"),
    ("random", "data.path_to_cache=/tmp/idx"),
])
def test_data_fields_other_data_types_read_are_an_error(data, override):
    msg = config_error(f"data={data}", override)
    key = override.split("=", 1)[0]
    assert f"{key}=" in msg and f"data={data}" in msg


def test_reset_attention_mask_is_an_error():
    msg = config_error("data.reset_attention_mask=true")
    assert "data.reset_attention_mask=true" in msg and "no effect" in msg
    load_config("data=mock", "data.reset_position_ids=true")


def test_masked_lm_data_fields_on_gpt_are_an_error():
    msg = config_error("data.masking_probability=0.3")
    assert "data.masking_probability=0.3" in msg and "model.type=gpt" in msg
    load_config("model=bert_tiny", "data.masking_probability=0.3")


def test_gpt_data_fields_on_masked_lm_models_are_an_error():
    msg = config_error("model=t5_tiny", "data.eod_mask_loss=true")
    assert "data.eod_mask_loss=true" in msg and "model.type=t5" in msg
    load_config("data=mock", "data.eod_mask_loss=true")


@pytest.mark.parametrize("field", ["reset_position_ids", "eod_mask_loss"])
def test_document_fields_on_the_embedded_corpus_are_an_error(field):
    """Each embedded sample is one packed document (framework/data/embedded.py), and the
    answer-only loss already leaves its end-of-document token out: both change nothing."""
    msg = config_error(f"data.{field}=true")
    assert f"data.{field}=true" in msg and "data=embedded" in msg


def test_geometric_spans_refuse_longer_ngrams_and_permutation():
    # T5's spans are geometric when the field is null: megatron-core asserted in the worker
    msg = config_error("model=t5_tiny", "data.masking_do_permutation=true")
    assert "data.masking_do_permutation=true" in msg and "model.type=t5" in msg
    msg = config_error("model=bert_tiny", "data.masking_use_geometric_distribution=true",
                       "data.masking_use_longer_ngrams=true")
    assert "data.masking_use_longer_ngrams=true" in msg
    load_config("model=bert_tiny", "data.masking_do_permutation=true")
    load_config("model=t5_tiny", "data.masking_use_geometric_distribution=false",
                "data.masking_use_longer_ngrams=true")


# ---- run settings that need another switch ---------------------------------------------------
def test_profile_options_without_profile_steps_are_an_error():
    msg = config_error("train.profile.with_stack=true")
    assert "train.profile.with_stack=true" in msg and "train.profile.steps" in msg
    assert "train.profile.ranks=[1]" in config_error("train.profile.ranks=[1]")
    load_config("train.profile.steps=[1,2]", "train.profile.with_stack=true",
                "train.profile.ranks=null")


def test_max_consecutive_nan_with_stop_policy_is_an_error():
    msg = config_error("train.nan_policy=stop", "train.max_consecutive_nan=3")
    assert "train.max_consecutive_nan=3" in msg and "train.nan_policy=stop" in msg
    load_config("train.nan_policy=skip", "train.max_consecutive_nan=3")


def test_eval_iters_zero_with_evaluation_on_is_an_error():
    msg = config_error("train.eval_iters=0")
    assert "train.eval_iters=0" in msg and "train.eval_interval=500" in msg
    load_config("train.eval_iters=0", "train.eval_interval=0")


def test_keep_last_without_saving_is_an_error():
    msg = config_error("checkpoint.save=false", "checkpoint.keep_last=2")
    assert "checkpoint.keep_last=2" in msg and "checkpoint.save=false" in msg
    load_config("checkpoint.keep_last=2")


def test_allow_pickle_without_load_hf_is_an_error():
    msg = config_error("checkpoint.allow_pickle=true")
    assert "checkpoint.allow_pickle=true" in msg and "checkpoint.load_hf" in msg
    load_config("data=mock", "checkpoint.load_hf=hf_dir", "checkpoint.allow_pickle=true")


def test_wandb_settings_without_wandb_are_an_error():
    msg = config_error("logging.wandb_project=p")
    assert "logging.wandb_project=p" in msg and "logging.wandb=false" in msg
    assert "logging.wandb_mode=offline" in config_error("logging=tensorboard",
                                                        "logging.wandb_mode=offline")
    load_config("logging=wandb", "logging.wandb_project=p", "logging.wandb_mode=offline")


def test_distributed_backend_on_cpu_is_an_error():
    cfg = load_config("parallel.distributed_backend=ucc")
    msg = world_error(cfg, 1, on_gpu=False)
    assert "parallel.distributed_backend=ucc" in msg and "gloo" in msg
    load_config("parallel.distributed_backend=ucc").resolve_world(1, on_gpu=True)
    load_config("parallel.distributed_backend=gloo").resolve_world(1, on_gpu=False)


# ---- checkpoint.load_hf is checked when the run is planned, not in the worker ------------------
def test_load_hf_is_checked_before_any_worker_starts(tmp_path):
    """A missing directory used to surface as 'data=indexed needs a tokenizer' (or, with
    data=mock, in the worker after the model was built); another architecture only in the
    worker. Both are now one line from make_plan."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from framework.plan import make_plan

    common = ("data=mock", "train.device=cpu", f"checkpoint.dir={tmp_path}/ckpt")
    with pytest.raises(ConfigError) as e:
        make_plan(load_config(*common, f"checkpoint.load_hf={tmp_path}/nope"))
    assert f"{tmp_path}/nope is not a directory" in str(e.value) and "\n" not in str(e.value)
    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                               n_positions=64)).save_pretrained(hf)
    with pytest.raises(ConfigError) as e:
        make_plan(load_config(*common, "model=llama_tiny", f"checkpoint.load_hf={hf}"))
    assert "the Hugging Face model in" in str(e.value) and "\n" not in str(e.value)


# ---- found by the 2026-12-05 (thirteenth session) audit --------------------------------------
def test_overlap_p2p_comm_without_interleaving_is_an_error():
    """megatron-core's non-interleaved 1F1B schedule raised at the first step."""
    msg = config_error("model=gpt_tiny", "parallel.pipeline_model_parallel_size=2",
                       "parallel.overlap_p2p_comm=true")
    assert "parallel.overlap_p2p_comm=true" in msg and "interleaved" in msg
    load_config("model=gpt_tiny", "parallel=pp2_vpp2", "parallel.overlap_p2p_comm=true")


def test_min_lr_with_constant_lr_is_an_error():
    msg = config_error("optimizer.lr_decay_style=constant", "optimizer.min_lr=1e-5")
    assert "optimizer.min_lr=1e-05" in msg and "constant" in msg
    cfg = load_config("optimizer.lr_decay_style=constant")  # min_lr resolved, unused: fine
    assert cfg.optimizer.min_lr is not None


@pytest.mark.parametrize("override", ["model.relative_attention_num_buckets=16",
                                      "model.relative_attention_max_distance=256"])
def test_relative_attention_fields_outside_relative_bias_are_an_error(override):
    msg = config_error("model=gpt_tiny", override)
    assert override.split("=")[0] in msg and "relative position bias" in msg
    load_config("model=t5_tiny", override)


@pytest.mark.parametrize("kernel", ["cudnn", "augmented"])
def test_alibi_kernel_by_name_in_fp32_on_gpu_is_an_error(kernel):
    """SDPAttention would take FlexAttention or the dense bias instead (fp32 on a GPU)."""
    cfg = load_config("model.position_embedding_type=alibi", f"model.alibi_kernel={kernel}",
                      "train.bf16=false")
    msg = world_error(cfg, 1, on_gpu=True)
    assert f"model.alibi_kernel={kernel}" in msg and "fp32" in msg
    load_config("model.position_embedding_type=alibi", f"model.alibi_kernel={kernel}"
                ).resolve_world(1, on_gpu=True)


def test_alibi_kernel_cudnn_with_a_head_dim_cudnn_refuses_is_an_error():
    cfg = load_config("model.position_embedding_type=alibi", "model.alibi_kernel=cudnn",
                      "model.kv_channels=12")
    msg = world_error(cfg, 1, on_gpu=True)
    assert "model.alibi_kernel=cudnn" in msg and "(got 12)" in msg


def test_flex_kernel_options_where_flex_does_not_run_are_an_error():
    opts = ("model.position_embedding_type=alibi", "model.flex_kernel_options={BLOCK_M:64}")
    msg = world_error(load_config(*opts), 1, on_gpu=True)  # bf16: cuDNN or extra head dims
    assert "model.flex_kernel_options" in msg and "model.alibi_kernel=flex" in msg
    load_config(*opts, "model.alibi_kernel=flex", "model.attention_dropout=0"
                ).resolve_world(1, on_gpu=True)
    load_config(*opts, "train.bf16=false").resolve_world(1, on_gpu=True)  # fp32: flex runs


@pytest.mark.parametrize("override, want", [
    ("logging.wandb_project=a/b:c", "logging.wandb_project='a/b:c' is not a W&B project name"),
    ("logging.wandb_project=''", "logging.wandb_project='' is not a W&B project name"),
    ("logging.wandb_tags=[ok," + "x" * 65 + "]", "is not a W&B tag (1 to 64 characters)"),
])
def test_wandb_names_w_and_b_refuses_are_refused_up_front(override, want):
    """W&B refuses these only in wandb.init, after the model and checkpoint were loaded (a
    UsageError or pydantic traceback)."""
    assert want in config_error("logging=wandb", override)


def test_rope_seq_length_beyond_the_declared_context_is_an_error():
    """model=llama_tiny model.seq_length=128 (its max_position_embeddings is 64) trained at 128;
    generation then refused prompts over the 64 positions the checkpoint recorded."""
    msg = config_error("model=llama_tiny", "model.seq_length=128")
    assert msg.startswith("model.seq_length=128 exceeds model.max_position_embeddings=64, the "
                          "context the checkpoint would record") and "at least 128" in msg, msg
    load_config("model=llama_tiny", "model.seq_length=128", "model.max_position_embeddings=128")
