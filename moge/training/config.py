"""Run configuration: one small dataclass per concern, composed into `RunConfig`.

The `moe` section is `moge.layer.MoGEConfig` without `d_model` (taken from `model`).
Loading from YAML, dotted overrides and error messages live below the dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moge._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_path,
    shown,
)
from moge.distributed.config import ParallelConfig
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig
from moge.routing import QUOTA_ROUTERS
from moge.sigma.domains import check_domains_spec, check_run_domains
from moge.training import safeyaml
from moge.training.durable import write_atomic

DTYPES = ("float32", "bfloat16")


@dataclass
class DataConfig:
    """Where tokens come from. path None: the built-in offline corpus (pydoc_data)."""

    path: str | None = None  # a text file, a folder of text files, or a uint16 .bin
    seq_len: int = 128  # tokens per training sequence; <= model.max_seq_len
    val_fraction: float = 0.1  # share of the corpus (seeded random chunks) held out, in (0, 0.5]
    seed: int = 0  # seed of the batch sampler
    domains: str | dict[str, list[str]] | None = None  # topics, subfolders or {name: [glob, ...]}; None: none
    only_domain: str | None = None  # with domains: keep this domain alone (a domain sub-model's data)

    def __post_init__(self) -> None:
        check_path("data.path", self.path)
        check_domains_spec(self.domains, self.only_domain, self.path)  # moge.sigma.domains
        check_int("data.seq_len", self.seq_len, minimum=1)
        check_float("data.val_fraction", self.val_fraction, minimum=0.0, maximum=0.5, strict_min=True)
        check_int("data.seed", self.seed, minimum=0)


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping of `moge train`."""

    steps: int = 600  # optimiser steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr: float = 3e-4  # floor of the learning-rate decay after warm-up
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: str = "float32"  # autocast dtype for the forward pass
    seed: int = 1337  # torch seed set before the model is built (parameter init)
    log_every: int = 25  # steps between log lines
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 8  # validation batches per periodic evaluation
    save_every: int = 200  # 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk
    out_dir: str | None = None  # None: runs/<name>, then ,KEY=VALUE per override (README)
    resume: bool = False  # continue from the latest checkpoint in out_dir
    device: str = "cpu"  # cpu or cuda
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    compile: bool = False  # torch.compile attention halves + FFN elementwise; eager (warned) if it fails

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_last"):
            check_int(f"train.{name}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "threads"):
            check_int(f"train.{name}", getattr(self, name), minimum=0)
        check_int("train.threads", self.threads, minimum=0, maximum=1024)  # each is an OS thread
        check_float("train.lr", self.lr, minimum=0.0, strict_min=True)
        check_float("train.min_lr", self.min_lr, minimum=0.0)
        check_float("train.weight_decay", self.weight_decay, minimum=0.0)
        check_float("train.beta1", self.beta1, minimum=0.0, maximum=0.999999)
        check_float("train.beta2", self.beta2, minimum=0.0, maximum=0.999999)
        check_float("train.grad_clip", self.grad_clip, minimum=0.0)
        check_choice("train.dtype", self.dtype, DTYPES)
        check_path("train.out_dir", self.out_dir)
        if self.out_dir is not None and not self.out_dir.strip():
            # "" would be the current folder (Path("") is "."): a typo such as `train.out_dir=`
            # must not spread a run over wherever the command was started.
            raise ValueError(
                f"train.out_dir: is empty ({self.out_dir!r}); leave it out for runs/<name>, "
                "or name a folder ('.' for the current one)"
            )
        check_bool("train.resume", self.resume)
        check_bool("train.compile", self.compile)
        check_choice("train.device", self.device, ("cpu", "cuda"))
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr: {self.min_lr} is above train.lr={self.lr}")


@dataclass
class EvalConfig:
    """What `moge eval` measures."""

    batches: int = 32  # validation batches measured
    batch_size: int = 16  # sequences per batch
    plots: bool = True  # also draw plots (matplotlib) of what was measured

    def __post_init__(self) -> None:
        check_int("eval.batches", self.batches, minimum=1)
        check_int("eval.batch_size", self.batch_size, minimum=1)
        check_bool("eval.plots", self.plots)


@dataclass
class MonitorConfig:
    """Routing-collapse warnings during `moge train` (moge.diagnostics.collapse)."""

    every: int = 50  # steps per check; routing counts are summed over them; 0: off
    min_effective_share: float = 0.5  # warn when exp(load entropy) < this share of the experts; 0: never
    max_logit_growth: float = 20.0  # warn when router-logit RMS exceeds this x its first check; 0: never
    max_dead_experts: int = 0  # warn when more experts than this got no token in a check; -1: never

    def __post_init__(self) -> None:
        check_int("monitor.every", self.every, minimum=0)
        check_float("monitor.min_effective_share", self.min_effective_share, minimum=0.0, maximum=1.0)
        check_float("monitor.max_logit_growth", self.max_logit_growth, minimum=0.0)
        check_int("monitor.max_dead_experts", self.max_dead_experts, minimum=-1)


@dataclass
class RunConfig:
    """Everything one run needs; `moe` is a full MoGEConfig (d_model from `model`)."""

    name: str  # run name; default out_dir is runs/<name>
    model: ModelConfig  # the decoder
    moe: MoGEConfig  # every MoE block's FFN (fields: see moge.layer.MoGEConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the token stream
    train: TrainConfig = field(default_factory=TrainConfig)  # `moge train`
    eval: EvalConfig = field(default_factory=EvalConfig)  # `moge eval`
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # torchrun / expert parallel
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # routing collapse warnings

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "\0" in self.name:
            raise ValueError(f"name: expected a non-empty string without NUL bytes, got {shown(self.name)}")
        if self.moe.d_model != self.model.d_model:
            raise ValueError(
                f"moe.d_model: {self.moe.d_model} differs from model.d_model={self.model.d_model}"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.moe.router == "random" and self.moe.rre_vocab_size not in (None, self.model.vocab_size):
            raise ValueError(
                f"moe.rre_vocab_size: {self.moe.rre_vocab_size} differs from model.vocab_size="
                f"{self.model.vocab_size}"
            )
        self._check_parallel()
        check_run_domains(self)  # data.domains vs moe.rre_domain_groups (moge.sigma.domains)

    def _check_parallel(self) -> None:
        p, W = self.parallel, self.parallel.expert_parallel
        if self.moe.num_groups % W:
            raise ValueError(
                f"parallel.expert_parallel: {W} ranks do not divide moe.num_groups={self.moe.num_groups}; "
                "every rank must hold the same number of whole groups"
            )
        if p.backend is not None and (p.backend == "nccl") != (self.train.device == "cuda"):
            raise ValueError(
                f"parallel.backend: {p.backend} does not fit train.device={self.train.device} "
                "(nccl is for cuda, gloo for cpu; leave it null to choose automatically)"
            )
        if p.mixed_precision and self.train.dtype != "bfloat16":
            raise ValueError(
                f"parallel.mixed_precision: casts the parameters to bf16, which needs train.dtype "
                f"bfloat16 (got {self.train.dtype})"
            )
        if p.static_splits and self.moe.router not in QUOTA_ROUTERS:
            raise ValueError(
                f"parallel.static_splits: the {self.moe.router} router gives no per-group quota, so its "
                f"splits vary (static splits need moe.router {' or '.join(QUOTA_ROUTERS)})"
            )


# ---------------------------------------------------------------------------------------
# Loading: YAML file -> raw dict -> (overrides) -> validated RunConfig.
#
# Rules (the README repeats them):
# - Unknown keys are errors at every level (a typo must not silently fall back to a default).
# - A section left empty (`train:` with nothing under it) means "all defaults".
# - Float fields accept ints (`rope_theta: 10000`) and numeric strings: PyYAML follows YAML
#   1.1, where `1e-3` and `3e-4` are strings (a float needs a dot and a signed exponent).
# - `moe.d_model` is filled from `model.d_model`. Writing it anyway is accepted when it
#   equals model.d_model (so `dataclasses.asdict(cfg)` loads back) and an error otherwise.
# - The random (RRE) router's `moe.rre_vocab_size` defaults to `model.vocab_size`.

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoGEConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "parallel": ParallelConfig,
    "monitor": MonitorConfig,
}
TOP_LEVEL_KEYS = ("name", *SECTIONS)


def _keys(section: str) -> tuple[str, ...]:
    """Keys a section accepts, sorted, as listed in error messages."""
    names = (f.name for f in dataclasses.fields(SECTIONS[section]))
    return tuple(sorted(n for n in names if not (section == "moe" and n == "d_model")))


_FLOAT_TYPES = (float, Optional[float], "float", "Optional[float]", "float | None")  # noqa: UP045


@functools.cache
def _float_fields(cls: type) -> frozenset[str]:
    # Annotations are strings under `from __future__ import annotations`; compare them as
    # written rather than evaluating them (typing.get_type_hints needs every name importable).
    return frozenset(f.name for f in dataclasses.fields(cls) if f.type in _FLOAT_TYPES)


def _required(cls: type) -> list[str]:
    missing = dataclasses.MISSING
    return [f.name for f in dataclasses.fields(cls) if f.default is missing and f.default_factory is missing]


def _coerce_float(value: Any) -> Any:
    """int -> float, numeric string -> float; anything else is left for the validator."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # beyond every float: check_float names the field
            return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _unknown_key(dotted: str, valid: Sequence[str]) -> str:
    return f"{dotted}: unknown key; valid keys: {', '.join(valid)}"


def _key_text(key: Any) -> str:
    """A section's key as written: a string bare, anything else (YAML reads `on:` as
    True, `1:` as 1) as its repr with what it is."""
    if isinstance(key, str):
        return shown(key)[1:-1]
    return f"{shown(key)} (a {type(key).__name__} key, not a string)"


def _section_dict(raw: Mapping[str, Any], section: str, source: str) -> dict[str, Any]:
    value = raw.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{section}: expected a mapping of keys, got {type(value).__name__} {shown(value)} (in {source})"
        )
    valid = _keys(section)
    extra = ("d_model",) if section == "moe" else ()
    for key in value:
        if key not in valid and key not in extra:
            raise ValueError(f"{_unknown_key(f'{section}.{_key_text(key)}', valid)} (in {source})")
    return dict(value)


def _build(section: str, kwargs: dict[str, Any], source: str) -> Any:
    """Construct one section's dataclass, naming the dotted field in every error."""
    cls = SECTIONS[section]
    floats = _float_fields(cls)
    kwargs = {k: _coerce_float(v) if k in floats else v for k, v in kwargs.items()}
    for name in _required(cls):
        if name not in kwargs:
            raise ValueError(f"{section}.{name}: required key is missing (in {source})")
    try:
        return cls(**kwargs)
    except ValueError as err:
        # MoGEConfig (moge.layer) names bare fields; the others already say "model.x: ...".
        message = f"moe.{err}" if section == "moe" else str(err)
        raise ValueError(f"{message} (in {source})") from err


def config_from_dict(d: Any, source: str = "<dict>") -> RunConfig:
    """Validate a raw mapping (parsed YAML, or a checkpoint's saved config) into a RunConfig.

    `source` names where `d` came from in every error message. `d` is not modified.
    """
    if not isinstance(d, dict):
        raise ValueError(
            f"{source}: expected a mapping of sections ({', '.join(TOP_LEVEL_KEYS)}), got {type(d).__name__}"
        )
    for key in d:
        if key not in TOP_LEVEL_KEYS:
            raise ValueError(
                f"{_unknown_key(shown(key).strip(chr(39)), sorted(TOP_LEVEL_KEYS))} (in {source})"
            )
    if "name" not in d:
        raise ValueError(f"name: required key is missing (in {source})")
    model = _build("model", _section_dict(d, "model", source), source)
    moe_kwargs = {"d_model": model.d_model, **_section_dict(d, "moe", source)}
    if moe_kwargs.get("router") == "random" and moe_kwargs.get("rre_vocab_size") is None:
        moe_kwargs["rre_vocab_size"] = model.vocab_size
    moe = _build("moe", moe_kwargs, source)
    sections = ("data", "train", "eval", "parallel")
    data, train, eval_, parallel = (_build(s, _section_dict(d, s, source), source) for s in sections)
    monitor = _build("monitor", _section_dict(d, "monitor", source), source)
    try:
        return RunConfig(
            name=d["name"], model=model, moe=moe, data=data, train=train, eval=eval_, parallel=parallel,
            monitor=monitor,
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{err} (in {source})") from err


def _parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], '3e-4'): the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {shown(text)}: expected KEY=VALUE, e.g. train.steps=50")
    path = key.split(".")
    if path != ["name"]:
        if path[0] not in SECTIONS or len(path) != 2:
            shapes = ", ".join(f"{s}.KEY" for s in SECTIONS)
            raise ValueError(f"override {shown(text)}: {key}: not a field; expected name or {shapes}")
        if key == "moe.d_model":
            raise ValueError(f"override {shown(text)}: moe.d_model: follows model.d_model; override that")
        if path[1] not in _keys(path[0]):
            raise ValueError(f"override {shown(text)}: {_unknown_key(key, _keys(path[0]))}")
    return path, safeyaml.loads(value, f"override {shown(text)}: the value")


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of raw config `d` with dotted KEY=VALUE overrides applied (later ones win)."""
    out = copy.deepcopy(dict(d))
    for text in overrides:
        path, value = _parse_override(text)
        if len(path) == 1:
            out["name"] = value
            continue
        section = out.get(path[0])
        if section is None:
            section = out[path[0]] = {}
        if isinstance(section, dict):  # else config_from_dict reports the broken section
            section[path[1]] = value
    return out


def read_config_yaml(path: Path) -> dict[str, Any]:
    """A run config file's mapping of sections, read strictly."""
    # Regular files only, bounded size, depth and alias expansion, duplicate keys refused.
    data = safeyaml.read_file(path)
    if data is None:
        raise ValueError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of sections ({', '.join(TOP_LEVEL_KEYS)}), "
            f"got a YAML {type(data).__name__}"
        )
    return data


CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"  # the presets of a source checkout


def preset_names() -> list[str]:
    """Names of the YAML presets that `moge train NAME` accepts (configs/*.yaml)."""
    folders = (Path("configs"), CONFIGS_DIR)
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def resolve_config_path(path: str | Path) -> Path:
    """A config file's path: `path` itself if it exists, else a preset name such as
    "tiny-moge" looked up as configs/<name>.yaml (in the working folder, then beside
    the package). A missing file raises FileNotFoundError listing the presets."""
    given = Path(path)
    if given.exists() or given.suffix in (".yaml", ".yml") or len(given.parts) != 1:
        if not given.exists():
            raise FileNotFoundError(
                f"config file not found: {given} (presets: {', '.join(preset_names()) or 'none found'})"
            )
        return given
    for folder in (Path("configs"), CONFIGS_DIR):
        candidate = folder / f"{given}.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config file not found: {given} is neither a file nor a preset "
        f"(presets: {', '.join(preset_names()) or 'none found'})"
    )


# Overrides that change no result and do not name the run folder.
BOOKKEEPING_OVERRIDES = ("name", "train.out_dir", "train.resume", "train.threads", "train.log_every")


def default_out_dir(name: str, overrides: Sequence[str]) -> str:
    """runs/<name>, then ",KEY=VALUE" for each override that can change the result.

    `moge train configs/tiny-moge.yaml train.steps=50 moe.router=global` therefore
    writes runs/tiny-moge,train.steps=50,moe.router=global and never collides with
    the plain run in runs/tiny-moge; running the same command again with
    train.resume=true finds it. Characters unsafe in a folder name become "_"; a very
    long list is cut and ends with a hash of the whole.
    """
    parts = []
    for text in overrides:
        key, sep, value = (piece.strip() for piece in text.partition("="))
        if key not in BOOKKEEPING_OVERRIDES:
            # Named as parsed: "model.d_model = 64" is the run of "model.d_model=64".
            parts.append(re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{key}{sep}{value}"))
    folder = ",".join([name, *parts])
    if len(folder) > 120:
        digest = hashlib.sha1(folder.encode()).hexdigest()[:10]
        folder = f"{folder[:100]}-{digest}"
    return str(Path("runs") / folder)


_FIELD_AT_START = re.compile(r"^([\w.]+):")


def _mentions(message: str, text: str) -> bool:
    return bool(text) and re.search(rf"(?<![\w.]){re.escape(text)}(?![\w])", message) is not None


def _blamed_overrides(message: str, overrides: Sequence[str]) -> list[str]:
    """The overrides an error comes from: the one that set the field it names, else (a
    rule between fields, e.g. num_groups against num_experts) those whose dotted key the
    message names (min_lr against train.lr, data.seq_len against model.max_seq_len) and
    those of the same section whose field, or whose value when it is a word, it names."""
    match = _FIELD_AT_START.match(message)
    field_ = match.group(1) if match else None
    parts = [(o, o.partition("=")[0].strip(), o.partition("=")[2].strip()) for o in overrides]
    exact = [o for o, key, _ in parts if key == field_]
    if exact or not field_ or "." not in field_:
        return exact[-1:]
    section = field_.split(".")[0] + "."
    return [
        o
        for o, key, value in parts
        if ("." in key and _mentions(message, key))
        or (
            key.startswith(section)
            and (
                _mentions(message, key[len(section) :])
                or (re.search("[A-Za-z]", value) and _mentions(message, value))
            )
        )
    ]


def _name_the_override(message: str, path: Path, overrides: Sequence[str]) -> str:
    """An error's "(in <file>)" becomes "(in override 'KEY=VALUE')" when what it names
    was set on the command line (see _blamed_overrides)."""
    given = _blamed_overrides(message, overrides)
    if not given:
        where = str(path)
    elif len(given) == 1:
        where = f"override {shown(given[0])}"  # quoted, cut short
    else:
        where = "overrides " + ", ".join(shown(o) for o in given)
    return message.replace(f"(in {_PENDING})", f"(in {where})")


_PENDING = "<config being loaded>"


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (a path or a preset name), apply dotted overrides, validate.

    `name` defaults to the file stem; `train.out_dir`, when neither the file nor an
    override sets it, to `default_out_dir(name, overrides)` if there are overrides.
    A bad value is reported as coming from the override that set it, else the file.
    """
    path = resolve_config_path(path)
    raw = read_config_yaml(path)
    raw.setdefault("name", path.stem)
    merged = apply_overrides(raw, overrides)
    train = merged.get("train")
    named = [o for o in overrides if o.partition("=")[0].strip() not in BOOKKEEPING_OVERRIDES]
    if named and (train is None or (isinstance(train, dict) and train.get("out_dir") is None)):
        name = merged["name"] if isinstance(merged["name"], str) and merged["name"] else path.stem
        merged["train"] = {**(train or {}), "out_dir": default_out_dir(name, overrides)}
    try:
        return config_from_dict(merged, source=_PENDING)
    except ValueError as err:
        raise ValueError(_name_the_override(str(err), path, overrides)) from err


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict of every resolved field (moe without d_model); config_from_dict inverts it."""
    out: dict[str, Any] = {"name": cfg.name}
    for section in SECTIONS:
        out[section] = dataclasses.asdict(getattr(cfg, section))
    del out["moe"]["d_model"]
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back to an equal RunConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    write_atomic(path, text.encode("utf-8"))  # a kill mid-write leaves the old or the new file
