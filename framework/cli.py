"""Helpers shared by the Hydra entry points (train.py, generate.py)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, TypeVar

from omegaconf import OmegaConf

from framework.launch_env import env_rank

T = TypeVar("T")


def _run_dir(root: str) -> str:
    """One run directory for every rank: under torchrun/SLURM the job id names it, because
    `${now:}` resolves differently on each rank (hydra issue 2070). A multi-node torchrun without
    --rdzv-id has the run id "none": the ranks then agree on the time through torchrun's store."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job != "none":
        return os.path.join(root, f"job-{job}")
    return os.path.join(root, _agreed_time() or datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


def _agreed_time() -> Optional[str]:
    """Under torchrun, the time of the first rank to ask, kept in the elastic agent's store
    (which exists before the workers start; MASTER_ADDR/MASTER_PORT name it). None elsewhere,
    or when the store cannot be reached (each rank then uses its own clock, as before)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta

    try:
        from torch.distributed import TCPStore

        store = TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                         int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=60))
        # one key per restart of the workers: a restarted run gets a directory of its own
        key = f"fw_run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        mine = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        return store.compare_set(key, "", mine).decode()  # set if absent; the stored value
    except Exception:  # noqa: BLE001 - a missing store only costs the agreement
        return None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fw_run_dir"):
        OmegaConf.register_new_resolver("fw_run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("fw_output_subdir"):
        # only rank 0 writes .hydra/
        OmegaConf.register_new_resolver("fw_output_subdir",
                                        lambda: ".hydra" if env_rank() == 0 else None)


# Overrides that leave the checkpoint directory name alone: how long a run goes, how it reports,
# where and how often it saves, and the device. The same run continues under them (e.g.
# `train.max_steps=4000 logging=wandb` resumes checkpoints/default). A key matches itself and
# every key below it (`train.profile` covers `train.profile.steps`). Every other override (model,
# parallel, optimizer, data, seed, batch sizes, checkpoint.load...) names a different run.
RUN_CONTROL_KEYS = (
    "train.max_steps", "train.max_minutes", "train.log_interval", "train.eval_interval",
    "train.eval_iters", "train.progress_bar", "train.profile", "train.spike_factor",
    "train.defer_step_stats", "train.watchdog_seconds", "train.device", "logging",
    "checkpoint.dir", "checkpoint.save",
    "checkpoint.save_interval", "checkpoint.keep_last", "checkpoint.allow_pickle",
    "checkpoint.allow_symlinks", "checkpoint.load_iteration", "checkpoint.verify",
    "data.num_workers", "data.pin_memory", "data.path_to_cache", "optimizer.override_on_resume",
)
# ...except in a sweep (-m), where jobs of different lengths must not continue one another
SWEEP_NAMED_KEYS = ("train.max_steps",)


def _override_key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _is_run_control(key: str, multirun: bool) -> bool:
    if multirun and key in SWEEP_NAMED_KEYS:
        return False
    return any(key == k or key.startswith(k + ".") for k in RUN_CONTROL_KEYS)


def task_overrides(hydra_cfg) -> List[str]:
    """The command line's overrides as typed. Iterating Hydra's `overrides.task` list would
    resolve an override's value (`optimizer.lr=${optimizer.min_lr}`, `checkpoint.dir=.../${hydra:
    job.num}`) as an interpolation of that list: an error for a key that does not exist, and a
    printed resume command with the value of the moment instead of the user's text."""
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)]


# (key, test on the typed config, why): a key given on the command line that has no effect
# unless the test holds. (Config's own checks compare with schema defaults, and conf/train.yaml
# sets some of these away from them, so only the command line tells what the user asked for.)
_NEEDS = (
    # (the config has filled a null optimizer.lr / min_lr from these by now: a preset default
    # that was used is the value the optimizer has)
    ("model.default_lr", lambda c: c.model.default_lr is not None
     and c.optimizer.lr == float(c.model.default_lr), "optimizer.lr is set and takes precedence"),
    ("model.default_min_lr", lambda c: c.model.default_min_lr is not None
     and c.optimizer.min_lr == float(c.model.default_min_lr),
     "optimizer.min_lr or optimizer.lr is set and takes precedence"),
)


def check_overrides_take_effect(cfg: Any, overrides: List[str]) -> None:
    """Refuse a command-line key that the rest of the config makes a no-op (`_NEEDS`)."""
    from framework.config import ConfigError

    given = {_override_key(o): o for o in overrides}
    for key, ok, why in _NEEDS:
        if key in given and not given[key].startswith("~") and not ok(cfg):
            raise ConfigError(f"{given[key].lstrip('+')} has no effect: {why}; unset it")


def checkpoint_overrides(task_overrides: List[str], multirun: bool = False) -> str:
    """The part of the command line that names the checkpoint directory: the overrides that
    change what is computed, sorted, joined by "," (Hydra's override_dirname format)."""
    lines = sorted(o for o in task_overrides if not _is_run_control(_override_key(o), multirun))
    return ",".join(lines)


def default_checkpoint_dir(override_dirname: str, cwd: str) -> str:
    """checkpoints/<overrides> (`checkpoint_overrides`): the same run resumes, another does not."""
    from framework.security.masking import is_secret_name, mask_text

    # a secret given as an override must not become part of a directory name
    parts = []
    for part in mask_text(override_dirname).split(","):
        key, eq, val = part.partition("=")
        if eq and is_secret_name(key.lstrip("+~")):
            val = "masked-" + hashlib.sha1(val.encode()).hexdigest()[:8]
        parts.append(key + eq + val)
    override_dirname = ",".join(parts)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(name) > 120:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return os.path.join(cwd, "checkpoints", name)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_errors(fn: Callable[[], T], job_dir: Optional[str] = None) -> Optional[T]:
    """Run `fn`; a config or input error becomes one line on stderr and exit code 2.

    With `job_dir` (one job of a `-m` sweep) nothing exits: the outcome is written to
    `<job_dir>/job_status.json` for the sweep summary and the sweep goes on with the next job.
    """
    global _task_started
    _task_started = True
    if job_dir is not None:
        return _record_job(fn, job_dir)
    from omegaconf.errors import OmegaConfBaseException

    from framework.config import ConfigError
    from framework.security.masking import mask_text

    try:
        return fn()
    except ConfigError as e:
        print(f"error: {mask_text(str(e))}", file=sys.stderr, flush=True)
    except OmegaConfBaseException as e:
        print(f"error: {mask_text(_omegaconf_line(e))}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as stop:  # Ctrl-C or a stop signal that ended the run early
        print(f"error: interrupted ({str(stop) or 'Ctrl-C'})", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(2)


def _omegaconf_line(e: BaseException) -> str:
    """One line for an OmegaConf error met while the config is read (a ConfigError behind it
    wins), naming the key where OmegaConf knows it (an interpolation to a key that does not
    exist names only the missing key)."""
    from framework.config import ConfigError

    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
        return str(cause)
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _record_job(fn: Callable[[], T], job_dir: str) -> Optional[T]:
    import traceback

    from omegaconf.errors import OmegaConfBaseException

    from framework.config import ConfigError
    from framework.security.masking import mask_text
    from framework.job_status import write_job_status

    try:
        out = fn()
    except (ConfigError, OmegaConfBaseException) as e:
        msg = (str(e).strip().splitlines() or [""])[0] if isinstance(e, ConfigError) \
            else _omegaconf_line(e)
        print(f"error: {mask_text(msg)}", file=sys.stderr, flush=True)
        write_job_status(job_dir, "failed", f"config error: {mask_text(msg)}")
        return None
    except Exception as e:  # a crashed job must not end the sweep
        traceback.print_exc()
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(f"error: job failed: {mask_text(msg)}", file=sys.stderr, flush=True)
        write_job_status(job_dir, "failed", mask_text(f"{type(e).__name__}: {msg}"))
        return None
    write_job_status(job_dir, "completed", None)
    return out


# --------------------------------------------------------------------------------------------
# Hydra's own errors as one line
# --------------------------------------------------------------------------------------------
_task_started = False  # set once the task function runs: later errors are the task's own


def run_hydra_main(main: Callable[[], Any], schema: type) -> None:
    """Call a `@hydra.main` function with the errors Hydra raises itself (an unknown group option
    or key, a value of the wrong type, an override it cannot parse, a run directory it cannot
    create) printed as one `error:` line with exit code 2, like our own config errors.
    `HYDRA_FULL_ERROR=1` keeps Hydra's full report; errors of the task itself keep theirs."""
    import hydra._internal.utils as hydra_utils

    real = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's own test for it
            return real(func)
        try:
            return func()
        except Exception as ex:
            line = None if _task_started and not _is_config_error(ex) else \
                hydra_error_line(ex, schema)
            if line is None:
                def again() -> Any:
                    raise ex

                return real(again)
            from framework.security.masking import mask_text

            print(f"error: {mask_text(line)}", file=sys.stderr, flush=True)
            sys.exit(2)

    hydra_utils.run_and_report = run_and_report
    try:
        main()
    finally:
        hydra_utils.run_and_report = real


def _is_config_error(ex: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from framework.config import ConfigError

    return isinstance(ex, (HydraException, OmegaConfBaseException, ConfigError))


_CONVERT = re.compile(r"Value '(.*)' of type '\w+' could not be converted to (\w+)")


def hydra_error_line(ex: BaseException, schema: type) -> Optional[str]:
    """One line for an error raised while Hydra composes the config (None: not such an error,
    e.g. a bug, which keeps its traceback). `schema` is the root dataclass, for suggestions."""
    from hydra.errors import (ConfigCompositionException, HydraException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, OmegaConfBaseException,
                                  ValidationError)

    from framework.config import ConfigError, did_you_mean, schema_keys

    def first(e: BaseException) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()

    if isinstance(ex, ConfigError):
        return str(ex)
    msg = first(ex)
    if isinstance(ex, ConfigCompositionException) and msg.startswith("Ambiguous value for "
                                                                     "argument '"):
        # a comma in a single run's value: Hydra's remedies are on the lines after the first
        override = msg[len("Ambiguous value for argument '"):].rstrip("'")
        key, _, value = override.partition("=")
        return (f"{override}: a comma makes a value a sweep; quote it for a string "
                f"({key}='{value}'), bracket it for a list ({key}=[{value}]), or pass -m to "
                f"sweep over it")
    if isinstance(ex, MissingConfigException):
        group, _, name = (ex.missing_cfg_file or "").rpartition("/")
        if group:
            opts = [o for o in (ex.options or []) if not o.endswith("_schema")]
            return (f"{group}={name}: no such {group} config; choose one of "
                    f"{', '.join(opts) or '(none)'}")
        return first(ex)
    if isinstance(ex, OverrideParseException):
        hint = ""
        key, eq, value = str(ex.override).partition("=")
        if eq and "=" in value and not value[:1] in "'\"":
            # e.g. a default checkpoint directory's name: checkpoints/optimizer.lr=1e-3
            hint = f"; quote a value that holds '=': \"{key}='{value}'\""
        return (f"cannot parse the override {ex.override!r}: {first(ex)} (Hydra's override "
                f"syntax){hint}")
    cause = ex.__cause__
    if isinstance(ex, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
        key = cause.full_key or ""
        msg = getattr(cause, "msg", None) or first(cause)
        msg = msg.strip().splitlines()[0]
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in" in msg:
            section = key.split(".")[0]
            if f"~{section}" in sys.argv[1:]:  # `~train train.max_steps=2`: removed, then set
                return (f"~{section} removes the whole {section} section, so none of its "
                        f"fields can be set after it: set or remove single fields "
                        f"({section}.<field>=...) instead")
            return f"unknown config key {key}{did_you_mean(key, schema_keys(schema))}"
        if isinstance(cause, ValidationError):
            override = first(ex).replace("Error merging override ", "")
            m = _CONVERT.fullmatch(msg)
            if m:
                kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}
                msg = f"{m.group(1)!r} is not {kind.get(m.group(2), m.group(2).lower())}"
            elif "is not Optional" in msg:
                msg = "it cannot be null"
            return f"{override}: {msg} ({key})" if key and key not in override else \
                f"{override}: {msg}"
        return f"{first(ex)} ({first(cause)})"
    if isinstance(ex, (HydraException, OmegaConfBaseException)):
        return first(ex) + (f" ({first(cause)})" if cause is not None else "")
    if isinstance(ex, ValueError) and first(ex).startswith("Config group override must be"):
        # `model=null`: Hydra's defaults list refuses it with a bare ValueError
        nulls = [a for a in sys.argv[1:] if "=" in a and
                 a.split("=", 1)[1].strip().lower() in ("null", "none", "~")]
        nulls.sort(key=lambda a: "." in a.split("=", 1)[0])  # a group (`model=`) first
        what = nulls[0] if nulls else "a config group override"
        return f"{what}: a config group takes one of its options by name, not null"
    if isinstance(ex, OSError) and not _task_started:  # e.g. the run directory
        where = f": {ex.filename}" if ex.filename else ""
        return f"{ex.strerror or first(ex)}{where} (creating the run directory or its files)"
    return None


def config_from_hydra(dcfg: Any, hydra_cfg: Any, conf_dir: str, multirun: bool) -> Any:
    """The typed `Config` of a composed train.yaml (`dcfg`, without its `hydra` node) and the
    Hydra config it was composed with (`hydra_cfg`: the `hydra` node, for the group choices, the
    overrides and the directories), after every check that needs no file: the group choices,
    `_target_` only at plugin points, no unknown keys, the dataclasses' own validation, and no
    override that would have no effect. `train.py` calls it for its run; a sweep for each job
    before the first one starts (framework/sweep.py)."""
    from framework.config import check_unknown_keys
    from framework.security.plugins import check_plugin_targets

    choices = dict(hydra_cfg.runtime.choices)
    check_group_choices(choices, conf_dir)
    check_required_groups(choices, conf_dir, ("model", "parallel", "optimizer", "data", "logging"))
    check_section_deletions(task_overrides(hydra_cfg), choices)
    if dcfg.checkpoint.dir is None:
        dcfg.checkpoint.dir = default_checkpoint_dir(
            checkpoint_overrides(task_overrides(hydra_cfg), multirun=multirun),
            hydra_cfg.runtime.cwd)
    dcfg.run_dir = hydra_cfg.runtime.output_dir
    check_plugin_targets(dcfg)  # `_target_` only at plugin points, before anything is built
    check_unknown_keys(dcfg)
    cfg = OmegaConf.to_object(dcfg)
    check_overrides_take_effect(cfg, task_overrides(hydra_cfg))
    launcher = choices.get("hydra/launcher")
    if not multirun and launcher not in (None, "basic") and env_rank() == 0:
        # Hydra uses the launcher for -m sweeps only
        print(f"note: hydra/launcher={launcher} launches -m sweeps only; this single run runs "
              f"here (add -m to launch it through {launcher})", flush=True)
    return cfg


def check_required_groups(choices: Dict[str, Any], conf_dir: str, groups: tuple) -> None:
    """Refuse a command line that removed a config group the run needs (`~model`): the schema's
    bare defaults would train in its place, under the removed preset's name."""
    from framework.config import ConfigError

    for group in groups:
        if choices.get(group) is None:
            opts = sorted(n[:-5] for n in os.listdir(os.path.join(conf_dir, group))
                          if n.endswith(".yaml") and not n.endswith("_schema.yaml"))
            raise ConfigError(f"~{group} removes the {group} config group, which a run needs: "
                              f"choose one of {', '.join(opts)} ({group}=<name>)")


def check_section_deletions(overrides: List[str], choices: Dict[str, Any]) -> None:
    """Refuse `~train`, `~checkpoint`, `~run_dir` (a whole section or top-level key that is not
    a config group): the schema's bare defaults ran in place of train.yaml's and of the user's
    own overrides of it (300 steps where 2 were asked for)."""
    from framework.config import ConfigError

    for o in overrides:
        if o.lstrip("~+").split("=", 1)[0] == "run_dir":
            raise ConfigError(f"{o}: run_dir is where Hydra puts this run (metrics, logs, its "
                              f"config): set it with hydra.run.dir=<dir> (hydra.sweep.dir with "
                              f"-m)")
        key = o[1:].split("=", 1)[0] if o.startswith("~") else ""
        if key and "." not in key and key not in choices:
            raise ConfigError(f"{o} removes the whole {key} section, whose schema defaults would "
                              f"then run in place of the config's and your overrides: set or "
                              f"remove single fields ({key}.<field>=...) instead")


def check_group_choices(choices: Dict[str, Any], conf_dir: str) -> None:
    """Refuse a group option that is an internal schema (`model=model_schema`)."""
    from framework.config import ConfigError

    for group, choice in choices.items():
        if isinstance(choice, str) and choice.endswith("_schema") and \
                os.path.isdir(os.path.join(conf_dir, group)):
            opts = sorted(n[:-5] for n in os.listdir(os.path.join(conf_dir, group))
                          if n.endswith(".yaml"))
            raise ConfigError(f"{group}={choice} is the schema, not a config; choose one of "
                              f"{', '.join(opts)}")


def install_masked_cfg_printing() -> None:
    """`--cfg job|hydra|all` prints the composed config with secrets masked."""
    import contextlib
    import io

    from hydra._internal.hydra import Hydra

    if getattr(Hydra.show_cfg, "_fw_masked", False):
        return
    real = Hydra.show_cfg

    def show_cfg(self, config_name, overrides: List[str], *args, **kwargs):
        from framework.security.masking import mask_hydra_output

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            real(self, config_name, overrides, *args, **kwargs)
        sys.stdout.write(mask_hydra_output(buf.getvalue(), overrides))

    show_cfg._fw_masked = True
    Hydra.show_cfg = show_cfg
