"""Every shipped config composes and validates; every validation rule fires with its fields."""
import glob
import os

import pytest

from framework.cli import register_resolvers
from framework.config import Config, ConfigError, register_configs
from helpers import ROOT, config_error, load_config, run_train

CONF = os.path.join(ROOT, "conf")
register_configs()
register_resolvers()


load = load_config


def options(group):
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))


@pytest.mark.parametrize("group", ["model", "parallel", "optimizer", "data", "logging"])
def test_every_conf_file_composes(group):
    for name in options(group):
        extra = ["data.path=[x]", "tokenizer.path=t"] if (group, name) == ("data", "indexed") else []
        if group == "model" and name == "gpt2_xl":
            extra = []  # 25 heads: composes at TP1
        cfg = load(f"{group}={name}", *extra)
        assert isinstance(cfg, Config)


def test_stable_names_and_gpt2_dims():
    cfg = load("model=gpt2_large")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (36, 1280, 20, 1024)
    assert m.position_embedding_type == "learned_absolute" and m.ffn == 5120
    for f in ("max_steps", "micro_batch_size", "global_batch_size", "eval_interval", "eval_iters",
              "log_interval", "seed", "device"):
        assert hasattr(cfg.train, f)
    for f in ("dir", "save_interval", "load"):
        assert hasattr(cfg.checkpoint, f)
    # derived values never leak between model configs
    assert load("model=gpt_tiny").model.ffn == 4 * 128


def test_required_parallel_layouts_exist():
    assert {"single", "tp2", "pp2", "tp2_pp2", "tp2_pp2_sp", "pp2_vpp2", "dp_distopt"} <= set(
        options("parallel"))
    assert {"gpt_tiny", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl"} <= set(options("model"))


BAD = [
    (["parallel=tp2", "model.num_attention_heads=3", "model.hidden_size=96"],
     ["model.num_attention_heads=3", "tensor_model_parallel_size=2"]),
    (["parallel=pp2", "model.num_layers=3"], ["model.num_layers=3", "pipeline_model_parallel_size=2"]),
    (["parallel=pp2_vpp2", "model.num_layers=6"], ["model.num_layers=6", "virtual_pipeline"]),
    (["train.global_batch_size=30", "train.micro_batch_size=4"],
     ["train.global_batch_size=30", "train.micro_batch_size=4"]),
    (["parallel=tp2_sp", "model.seq_length=63"], ["model.seq_length=63", "sequence_parallel"]),
    (["parallel.sequence_parallel=true"], ["sequence_parallel", "tensor_model_parallel_size"]),
    (["model.num_query_groups=3"], ["model.num_query_groups=3", "num_attention_heads=4"]),
    (["train.device=tpu"], ["train.device"]),
    (["optimizer.lr_decay_style=step"], ["optimizer.lr_decay_style"]),
    (["data.split='90,10'"], ["data.split"]),
]


@pytest.mark.parametrize("overrides,words", BAD)
def test_validation_errors_name_fields(overrides, words):
    msg = config_error(*overrides)  # a ConfigError of one line
    for w in words:
        assert w in msg, (w, msg)


def test_world_size_rules():
    cfg = load("parallel=tp2_pp2", "train.global_batch_size=32", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        cfg.resolve_world(6, on_gpu=True)
    cfg.resolve_world(8, on_gpu=True)
    assert cfg.parallel.data_parallel_size == 2
    cfg = load("train.global_batch_size=32", "train.micro_batch_size=16")
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        cfg.resolve_world(4, on_gpu=True)


@pytest.mark.parametrize("layout,word", [("pp2", "pipeline_model_parallel_size"),
                                         ("dp_distopt", "use_distributed_optimizer"),
                                         ("tp2_sp", "sequence_parallel")])
def test_cpu_refuses_gpu_only_layouts(layout, word):
    cfg = load(f"parallel={layout}")
    with pytest.raises(ConfigError, match=word):
        cfg.resolve_world(cfg.parallel.model_parallel_size, on_gpu=False)


def _train(*args, cwd):
    return run_train(*args, cwd=cwd, name=None, fast=False, expect=None, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["model=nope"], "model"),
    (["parallel=tp2", "model.num_attention_heads=3", "model.hidden_size=96"],
     "num_attention_heads"),
    (["train.max_steps=abc"], "max_steps"),
    (["train.device=cpu", "parallel=pp2"], "pipeline_model_parallel_size"),
    (["+train.bogus=1"], "bogus"),
])
def test_train_py_bad_config_is_one_clean_line(args, needle, tmp_path):
    r = _train(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cfg_job_prints_config(tmp_path):
    r = _train("--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "num_attention_heads" in r.stdout and "tensor_model_parallel_size" in r.stdout


def test_learning_rate_comes_from_the_model_preset_unless_given():
    """optimizer.lr/min_lr null -> the preset's default_lr/default_min_lr (min_lr: lr/10 if the
    preset gives none); an explicit value wins; every preset has a learning rate (one shared
    default once gave gpt2_large the tiny default job's 3e-3)."""
    import glob
    import os

    from helpers import ROOT, load_config

    c = load_config()
    assert (c.model.name, c.optimizer.lr, c.optimizer.min_lr) == ("gpt_tiny", 3e-3, 1e-4)
    c = load_config("model=gpt2_large")
    assert (c.optimizer.lr, c.optimizer.min_lr) == (2.5e-4, 2.5e-5)
    c = load_config("model=gpt2_large", "optimizer.lr=1e-3")
    assert (c.optimizer.lr, c.optimizer.min_lr) == (1e-3, 1e-4)
    c = load_config("model=gpt2_large", "optimizer.min_lr=0")
    assert (c.optimizer.lr, c.optimizer.min_lr) == (2.5e-4, 0.0)
    assert load_config("optimizer=sgd").optimizer.lr == 0.1
    for path in glob.glob(os.path.join(ROOT, "conf", "model", "*.yaml")):
        name = os.path.basename(path)[:-5]
        assert "\ndefault_lr:" in open(path).read(), name  # not the dataclass's fallback
        c = load_config(f"model={name}")
        assert c.optimizer.lr is not None and 0 < c.optimizer.min_lr < c.optimizer.lr, name
        if not name.endswith("_tiny"):
            assert c.optimizer.lr <= 1e-3, (name, c.optimizer.lr)
    assert "no default_lr" in config_error("model.default_lr=null")
