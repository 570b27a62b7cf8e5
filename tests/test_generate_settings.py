"""generate.py settings that other settings leave without effect are refused in one line, before
any model is built (the project rule: nothing a user does is silently ignored); a setting left at
its default never is.

The configs are composed in this process as generate.py composes them (Hydra on
conf/generate.yaml, then `generate.to_config`), and the ones accepted go on through
`framework.inference.prepare_job` against a tiny checkpoint of the embedded corpus."""
import os

import pytest
import torch

from framework.config import ConfigError, ModelConfig, ParallelConfig
from helpers import GENERATE, ROOT, one_line_config_error, run, save_tiny_gpt_checkpoint

CONF = os.path.join(ROOT, "conf")
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
            make_vocab_size_divisible_by=8, share_embeddings_and_output_weights=False)
PROMPTS = 'prompts=["1+2=", "7*8="]'


@pytest.fixture
def here(monkeypatch, tmp_path):
    """A scratch launch directory on a CPU machine, not under torchrun or SLURM; Hydra's global
    config is cleared afterwards."""
    from hydra.core.hydra_config import HydraConfig

    for name in ("WORLD_SIZE", "SLURM_NTASKS", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield str(tmp_path)
    HydraConfig.instance().cfg = None


def compose(cwd, *overrides):
    """The GenerateConfig generate.py makes of `overrides` launched in `cwd`."""
    import generate
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = hydra_compose(config_name="generate", overrides=list(overrides),
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cwd
        cfg.hydra.runtime.cwd = cwd
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return generate.to_config(cfg)


def refused(cwd, *overrides) -> str:
    """The one-line error generate.py reports for `overrides` (composition or prepare_job)."""
    with pytest.raises(Exception) as info:
        compose(cwd, *overrides)
    return one_line_config_error(info.value)


@pytest.fixture(scope="module")
def ckpt(mp1, tmp_path_factory):
    """A tiny GPT checkpoint of a data=embedded run (untied embeddings: PP2 runs on a CPU)."""
    return save_tiny_gpt_checkpoint(str(tmp_path_factory.mktemp("settings") / "ckpt"), **TINY)


# --------------------------------------------------------------------------------------------
# refused: a setting off its default that the others leave without effect
# --------------------------------------------------------------------------------------------
REFUSED = {
    # greedy decoding (top_k 0 or 1, top_p 0) takes the argmax: temperature changes nothing
    "temperature_greedy": (["temperature=0.7"],
                           "temperature=0.7 has no effect with greedy decoding (top_k=0, "
                           "top_p=0.0); sample with top_k > 1 or top_p > 0"),
    "temperature_top_k1": (["top_k=1", "temperature=1.5"],
                           "temperature=1.5 has no effect with greedy decoding (top_k=1"),
    # top-k keeps one token before top-p looks: top_p (and temperature) change nothing
    "top_p_top_k1": (["top_k=1", "top_p=0.9"], "top_p=0.9 has no effect with top_k=1"),
    "length_penalty_one_beam": (["length_penalty=0.7"],
                                "length_penalty=0.7 only acts in beam search; set num_beams > 1"),
    "early_stopping_one_beam": (["early_stopping=true"],
                                "early_stopping=true only acts in beam search; set num_beams > 1"),
    "early_never_one_beam": (["top_k=4", "early_stopping=never"],
                             "early_stopping=never only acts in beam search"),
    # top_p = max(top_p * decay, bound) stays 0 from top_p=0
    "top_p_decay_greedy": (["top_p_decay=0.5"],
                           "top_p_decay=0.5 has no effect with top_p=0.0 (it decays top_p"),
    "top_p_decay_top_k": (["top_k=5", "top_p_decay=0.5"],
                          "top_p_decay=0.5 has no effect with top_p=0.0"),
    "top_p_decay_beams": (["num_beams=3", "top_p_decay=0.5"],
                          "top_p_decay=0.5 has no effect with top_p=0.0"),
    # the bound is only read when top_p decays
    "top_p_bound_no_decay": (["top_p=0.9", "top_p_bound=0.3"],
                             "top_p_bound=0.3 has no effect with top_p_decay=0.0"),
    "num_heldout_with_prompts": ([PROMPTS, "num_heldout=5"],
                                 "num_heldout=5 has no effect with prompts given"),
    # the console shows completions only; logprobs go to output_file
    "return_logprobs_no_file": (["return_logprobs=true"],
                                "return_logprobs=true needs output_file=<file.jsonl>"),
    # the static (graphed) decode step: one beam, the KV cache, the lean step
    "graph_beams": (["num_beams=3", "decode_cuda_graph=true"],
                    "decode_cuda_graph=true has no effect here: beam search (num_beams=3)"),
    "graph_no_cache": (["use_cache=false", "decode_cuda_graph=true"],
                       "decode_cuda_graph=true has no effect here: it replays KV-cache steps "
                       "(use_cache=false)"),
    "graph_no_lean": (["lean_decode=false", "decode_cuda_graph=true"],
                      "decode_cuda_graph=true has no effect here: it captures the lean decode "
                      "step (lean_decode=false)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_setting_without_effect_refused(here, case):
    overrides, message = REFUSED[case]
    assert message in refused(here, *overrides)


# accepted: every setting acts (or is left at its default; a seed is harmless where nothing is
# drawn, and commonly left set)
ACCEPTED = [
    [],
    [PROMPTS, "max_new_tokens=8"],
    [PROMPTS, "top_p=0.8", "top_p_decay=0.5", "temperature=0.9", "output_file=out.jsonl",
     "return_logprobs=true"],
    [PROMPTS, "num_beams=4", "length_penalty=0.7"],
    [PROMPTS, "num_beams=3", "length_penalty=1.3", "early_stopping=never"],
    [PROMPTS, "num_beams=2", "early_stopping=true", "seed=7"],
    [PROMPTS, "top_k=5", "temperature=0.7", "seed=7"],
    [PROMPTS, "top_p=0.9", "top_p_decay=0.7", "top_p_bound=0.3"],
    [PROMPTS, "top_k=1"],  # greedy by top_k
    [PROMPTS, "seed=99", "temperature=1.0", "length_penalty=1.0", "early_stopping=false",
     "top_p_decay=0.0", "top_p_bound=0.0"],  # defaults given explicitly
    [PROMPTS, "num_heldout=200"],
    ["num_heldout=5"],  # held-out arithmetic: no prompts
    [PROMPTS, "decode_cuda_graph=true"],  # CPU: the static step runs eagerly
    [PROMPTS, "decode_cuda_graph=false", "num_beams=2"],
    [PROMPTS, "use_cache=false", "lean_decode=false"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=lambda o: " ".join(o) or "defaults")
def test_settings_that_act_accepted(here, ckpt, overrides):
    from framework.inference import prepare_job

    prepare_job(compose(here, f"load={ckpt}", "device=cpu", *overrides))


def test_yaml_defaults_are_the_schema_defaults(here):
    """A field left at conf/generate.yaml's value is never refused: the values the checks
    compare with are the yaml's."""
    from framework.inference import NUM_HELDOUT

    cfg = compose(here)
    assert cfg.num_heldout == NUM_HELDOUT and cfg.temperature == 1.0
    assert cfg.length_penalty == 1.0 and cfg.early_stopping == "false"
    assert cfg.top_p_decay == 0.0 and cfg.top_p_bound == 0.0 and cfg.decode_cuda_graph is None
    assert not cfg.return_logprobs and cfg.prompts is None


def test_decode_cuda_graph_with_pipeline_stages_refused(here, ckpt):
    """The graphed decode step is one stage's: at PP2 decode_cuda_graph=true did nothing."""
    from framework.inference import prepare_job

    args = [f"load={ckpt}", "device=cpu", PROMPTS, "parallel=pp2"]
    assert prepare_job(compose(here, *args)).parallel.pipeline_model_parallel_size == 2
    with pytest.raises(ConfigError, match="decode_cuda_graph=true has no effect at "
                                          "parallel.pipeline_model_parallel_size=2"):
        prepare_job(compose(here, *args, "decode_cuda_graph=true"))


def test_decode_cuda_graph_on_a_model_without_the_lean_step_noted(mp1, here):
    """Known only once the model is built: decode_cuda_graph=true on a model the lean decode
    step does not reproduce gets a line (printed with the `loaded ...` line), not silence."""
    from framework.inference import decode_graph_note
    from framework.models.build import build_model

    def model(**extra):
        return build_model(ModelConfig(**{**TINY, **extra}), ParallelConfig(), vocab_size=24,
                           bf16=False, fp16=False, device=torch.device("cpu"), wrap_ddp=False)

    other = model()
    # a layer option the lean step does not reproduce (config.py refuses this one for training,
    # since megatron-core's layer ignores it; the lean step refuses it all the same)
    other[0].config.apply_residual_connection_post_layernorm = True
    graph = compose(here, "decode_cuda_graph=true")
    assert "decode_cuda_graph=true is not used" in decode_graph_note(graph, other)
    assert decode_graph_note(graph, model()) is None
    assert decode_graph_note(compose(here), other) is None  # left unset: nothing to say


# --------------------------------------------------------------------------------------------
# parallel.*: training-only options are switched off with a note, as SP / recompute / VPP are
# --------------------------------------------------------------------------------------------
def test_parallel_training_options_switched_off_with_a_note(here):
    from framework.inference import inference_layout

    layout, notes = inference_layout(compose(here, "parallel=dp_distopt").parallel)
    assert notes == ["generation: parallel.use_distributed_optimizer=true, "
                     "parallel.overlap_grad_reduce=true, parallel.overlap_param_gather=true "
                     "switched off (no gradients or optimizer)"]
    assert not (layout.use_distributed_optimizer or layout.overlap_grad_reduce
                or layout.overlap_param_gather)
    _, notes = inference_layout(compose(here, "parallel=guide").parallel)
    assert len(notes) == 3 and any("sequence parallelism" in n for n in notes)
    assert "parallel.use_distributed_optimizer=true, parallel.overlap_grad_reduce=true " \
           "switched off" in notes[-1]
    layout, notes = inference_layout(compose(here, "parallel=pp2_vpp2",
                                             "parallel.overlap_p2p_comm=true").parallel)
    assert notes[-1] == ("generation: parallel.overlap_p2p_comm=true is not used (generation "
                         "sends activations between stages itself)")
    assert layout.overlap_p2p_comm is None
    for preset in ("tp2", "pp2", "single"):  # nothing switched off: nothing to say
        assert inference_layout(compose(here, f"parallel={preset}").parallel)[1] == []


def test_generate_py_reports_it_in_one_line(ckpt, tmp_path):
    """The command line: exit 2, one line, before any model is loaded."""
    r = run(GENERATE, f"load={ckpt}", "device=cpu", PROMPTS, "temperature=0.7", cwd=tmp_path,
            timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: temperature=0.7 has no effect with greedy decoding (top_k=0, top_p=0.0); sample "
        "with top_k > 1 or top_p > 0, or leave temperature=1.0"]
    assert "loaded" not in r.stdout


def test_output_file_inside_the_checkpoint_refused(here, ckpt):
    """output_file inside load= could replace one of the checkpoint's own files (framework.json
    of the iteration it reads): refused before any model work, whatever the spelling."""
    from framework.checkpoint import reader
    from framework.inference import prepare_job

    it_dir = reader.iter_dir(ckpt, reader.latest_iteration(ckpt))
    for target in (os.path.join(it_dir, reader.META), os.path.join(ckpt, "results.jsonl"),
                   os.path.join(ckpt, "..", os.path.basename(ckpt), "x", "out.jsonl")):
        with pytest.raises(ConfigError, match="is inside the checkpoint directory"):
            prepare_job(compose(here, f"load={ckpt}", "device=cpu", PROMPTS,
                                f"output_file={target}"))
    # beside it is fine

    prepare_job(compose(here, f"load={ckpt}", "device=cpu", PROMPTS,
                        f"output_file={ckpt}-results.jsonl"))


def test_damaged_checkpoint_refused_before_any_model_is_built(mp1, here, tmp_path):
    """The checkpoint's files are checked against its manifest in prepare_job, as train.py's
    plan does, so a damaged shard is one line before any worker builds a model."""
    import shutil

    from framework.checkpoint import reader
    from framework.inference import prepare_job

    src = save_tiny_gpt_checkpoint(str(tmp_path / "ckpt"), **TINY)
    it_dir = reader.iter_dir(src, reader.latest_iteration(src))
    shard = sorted(f for f in os.listdir(it_dir) if f.endswith(".distcp"))[0]
    with open(os.path.join(it_dir, shard), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ConfigError, match=f"{shard}"):  # (prepare_job builds no model)
        prepare_job(compose(here, f"load={src}", "device=cpu", PROMPTS))
    # verify=false skips the checksums (sizes still checked): prepared
    job = prepare_job(compose(here, f"load={src}", "device=cpu", PROMPTS, "verify=false"))
    assert job.verified is False
    shutil.rmtree(src)


def test_prompt_with_unknown_tokens_noted(here, ckpt):
    """The embedded corpus's character vocabulary has no letters: a prompt of words becomes
    unknown tokens, which a note says (it is not refused: a prompt may mix in a few)."""
    from framework.inference import prepare_job

    job = prepare_job(compose(here, f"load={ckpt}", "device=cpu", 'prompts=["1+2=", "hello 3"]'))
    unknown = [n for n in job.notes if "does not know" in n]
    assert len(unknown) == 1 and unknown[0].startswith("generation: prompt 1 has 5 token(s)"), \
        job.notes
    assert not any("does not know" in n for n in
                   prepare_job(compose(here, f"load={ckpt}", "device=cpu", PROMPTS)).notes)


@pytest.mark.parametrize("override, want", [
    ("+foo=1", "unknown config key foo (GenerateConfig has no such field)"),
    ("+tokenizer.bogus=1", "unknown config key tokenizer.bogus (TokenizerConfig has no such "
                           "field)"),
    ("+parallel.bogus=1", "unknown config key parallel.bogus (ParallelConfig has no such field)"),
    ("+max_new_token=3", "unknown config key max_new_token (GenerateConfig has no such field); "
                         "did you mean max_new_tokens?"),
])
def test_unknown_keys_added_with_plus_refused(here, override, want):
    """`+key=` bypasses Hydra's struct mode: generate.py accepted any such key and ignored it
    (train.py already refused them)."""
    assert refused(here, override).startswith(want)


def test_num_beams_above_the_vocabulary_and_a_negative_iteration_refused(here, ckpt):
    """num_beams=100000 on the 19-token embedded vocabulary ran for minutes (more beams than
    tokens can never be filled); iteration=-1 said "iter_-000001 is missing"."""
    from framework.inference import prepare_job

    with pytest.raises(ConfigError, match="num_beams=100000 is more than the 19 tokens"):
        prepare_job(compose(here, f"load={ckpt}", "device=cpu", PROMPTS, "num_beams=100000"))
    assert refused(here, f"load={ckpt}", "iteration=-1") == \
        "iteration=-1 must be >= 0 (null: the latest checkpoint)"


def test_recompute_settings_are_noted_as_unused():
    """parallel.recompute_modules / recompute_num_layers given to generate.py were accepted and
    ignored without a word (recompute_granularity already had its note)."""
    from framework.config import ParallelConfig
    from framework.inference import inference_layout

    p, notes = inference_layout(ParallelConfig(recompute_modules=["mlp"], recompute_num_layers=2))
    assert notes == ["generation: parallel.recompute_num_layers=2, parallel.recompute_modules="
                     "['mlp'] not used (no backward pass, nothing to recompute)"], notes
    assert p.recompute_modules == ParallelConfig().recompute_modules
    assert inference_layout(ParallelConfig())[1] == []


def test_a_distributed_backend_unused_on_the_cpu_refused(here, ckpt):
    """parallel.distributed_backend=ucc on a CPU run was accepted and ignored (gloo is used);
    train.py refused it already."""
    from framework.inference import prepare_job

    with pytest.raises(ConfigError, match="parallel.distributed_backend=ucc has no effect on the "
                                          "CPU"):
        prepare_job(compose(here, f"load={ckpt}", "device=cpu", PROMPTS,
                            "parallel.distributed_backend=ucc"))
