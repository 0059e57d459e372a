"""Training presets: a TOML file -> a frozen :class:`TrainConfig`, validated before any compute.

A preset has one table per section below; every key is optional (the defaults are the paper's
settings, seed §B.7) but unknown sections or keys, wrong types and out-of-range values are
refused with a message naming the file, the key and what is allowed. Shipped presets live in
``resources/presets/`` and can be named by their stem (``--config paper``).

Sections and their meaning:

* ``[run]`` seed, number of optimizer steps, logging/eval/checkpoint periods, device.
* ``[optim]`` Adam (no weight decay by default), linear warm-up then constant lr, grad clip.
* ``[data]`` global batch size (summed over all ranks), validation split, dose-valid
  augmentation, latent-cache folder.
* ``[model]`` VAE / DiT / preview-codec presets and optional initial weights.
* ``[diffusion]`` flow-matching parameterisation, shift, sampler for rollouts and evaluation.
* ``[any2any]`` how Stage A draws its target subsets.
* ``[vae_adapt]`` seed §E.2: ``frozen`` (default), ``decoder_lora`` or ``decoder_finetune``.
* ``[lora]`` rank/alpha of the post-training adapters.
* ``[scardnft]`` DiffusionNFT post-training (group size, beta, KL weight, reward weights).
* ``[refiner]`` the dose refiner of the ``dose-refiner`` stage (width, band, beam plate and
  quick-plan inputs).
* ``[beam_pairs]`` pairs of one patient's plans, for the flow stages and ``dose-refiner``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from engine.errors import UserError
from engine.resources import resources_dir


class ConfigError(UserError):
    """A preset that cannot be used; the message names the file and the offending key."""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    max_steps: int = 100_000
    log_every: int = 10
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    device: str = "auto"            # auto | cpu | cuda
    threads: int = 0                # CPU threads per process; 0 = torch's default


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 500
    grad_clip: float = 0.1          # global norm; 0 disables clipping
    decay_steps: int = 0            # the last this many steps of max_steps: lr falls linearly to 0


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 8             # global batch: summed over all ranks
    val_fraction: float = 0.1       # used when the dataset has no explicit validation split
    val_cases: int = 0              # evaluate on at most this many validation cases (0 = all)
    flip_lr: bool = False           # mirror patient left/right (beam + angle plates mirrored too)
    flip_si: bool = False           # mirror superior/inferior (coplanar beams are unchanged)
    shift_voxels: int = 0           # random integer translation of every slot, in voxels
    cache_dir: str = ""             # latent cache (stage `cache` writes it; diffusion stages read)
    grid: tuple[int, int, int] = (97, 128, 160)   # model grid (z, y, x) voxels
    # random crop (z, y, x) voxels of each training volume in the volume stages (vae, distill):
    # the convolutional VAE and codec learn the same from crops at a fraction of the cost;
    # (0, 0, 0) = the whole grid. Validation always uses the whole grid.
    crop: tuple[int, int, int] = (0, 0, 0)
    # hold each training case's latents in memory after its first read (one file read per case
    # instead of per sample: on a GPU the per-sample read bounds the step rate)
    latents_in_memory: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vae: str = "wan2.1"             # VAEConfig preset name
    vae_weights: str = ""           # safetensors with VAE weights (Wan or our bundle); "" = none
    dit: str = "wan2.1-1.3b"        # DiTConfig preset name
    dit_dim: int = 0                # overrides of the preset's sizes (0 = keep the preset's)
    dit_layers: int = 0
    dit_heads: int = 0
    dit_ffn_dim: int = 0
    init_from: str = ""             # model bundle folder, or Wan 2.1 DiT weights, to start from
    codec: str = "preview"          # TinyCodec preset name
    codec_weights: str = ""         # the distill stage's tiny_codec.safetensors, for exports
    gradient_checkpointing: bool = False  # recompute DiT blocks in backward (less memory)


@dataclass(frozen=True)
class DiffusionConfig:
    prediction: str = "v"           # v | epsilon | x0
    shift: float = 3.0
    timesteps: int = 1000
    sample_steps: int = 10
    solver: str = "euler"           # euler | dpm++2m (2nd order)


@dataclass(frozen=True)
class BeamPairsConfig:
    """Beam-aware training on pairs of plans of one patient (same anatomy, other beams).

    Flow stages: each batch element is a pair of plans (``weight`` 0: pairs only). Stage
    ``dose-refiner``: each patient with two physics plans adds a pair, and the loss adds
    ``weight`` (> 0) times the L1 of the pair's change (``trainer.stages.dose_refiner``)."""

    enabled: bool = False           # train on pairs of one patient's plans
    weight: float = 0.0             # weight of the pair's dose-difference loss


@dataclass(frozen=True)
class Any2AnyConfig:
    target_prob: float = 0.5        # each present slot is a target with this probability
    dose_target_prob: float = 0.5   # ... except dose, which is one more often when wanted


@dataclass(frozen=True)
class VAEAdaptConfig:
    mode: str = "frozen"            # frozen | decoder_lora | decoder_finetune
    lora_rank: int = 16
    loss_weight: float = 1.0        # weight of the decoded-volume L1 loss


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 64
    alpha: float = 64.0


@dataclass(frozen=True)
class ScardNFTConfig:
    group_size: int = 4             # rollouts (initial noises) per case
    beta: float = 1.0               # v+ = beta v_theta + (1-beta) v_old
    kl_weight: float = 1e-4         # weight of ||v_theta - v_base||^2
    adv_clip_max: float = 5.0
    decay_type: int = 1             # old-policy soft update schedule (DiffusionNFT types 0,1,2)
    train_timesteps: int = 2        # sampler timesteps trained per rollout per step
    scorecard_weight: float = 1.0   # reward = w_s * scorecard total - w_m * MAE (Gy)
    mae_weight: float = 1.0
    scorecard: str = "head_neck"    # shipped scorecard (head_neck, lung, prostate) or a path


@dataclass(frozen=True)
class RefinerTrainConfig:
    """The dose refiner the ``dose-refiner`` stage fits (``engine.models.dose_refiner``)."""

    hidden: int = 32                # width of its two hidden layers
    band_mm: float = 60.0           # voxels farther outside every target are not corrected
    beam_plate: bool = False        # the plan's beam plate is an input
    quick_plan: bool = False        # the plan's quick-plan dose is an input (engine.physics)
    clinical_style: bool = False    # clinical (1) or physics (0) plan is an input
    dit_class_solution: bool = False  # the DiT sees the class solution, not the plan's beams
    quick_plan_samples: int = 6000  # the quick plan's voxel sample (+ a third per target)
    quick_plan_max_iter: int = 50   # and its optimiser's iteration cap


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    any2any: Any2AnyConfig = field(default_factory=Any2AnyConfig)
    beam_pairs: BeamPairsConfig = field(default_factory=BeamPairsConfig)
    vae_adapt: VAEAdaptConfig = field(default_factory=VAEAdaptConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    scardnft: ScardNFTConfig = field(default_factory=ScardNFTConfig)
    refiner: RefinerTrainConfig = field(default_factory=RefinerTrainConfig)
    source: str = ""                # where the preset came from (for messages and provenance)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


_CHOICES = {
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("diffusion", "prediction"): ("v", "epsilon", "x0"),
    ("diffusion", "solver"): ("euler", "dpm++2m"),
    ("vae_adapt", "mode"): ("frozen", "decoder_lora", "decoder_finetune"),
    ("scardnft", "decay_type"): (0, 1, 2),
}
_POSITIVE = {("run", "max_steps"), ("run", "log_every"), ("run", "eval_every"),
             ("run", "checkpoint_every"), ("run", "keep_checkpoints"), ("optim", "lr"),
             ("optim", "eps"), ("data", "batch_size"), ("diffusion", "shift"),
             ("diffusion", "timesteps"), ("diffusion", "sample_steps"), ("vae_adapt", "lora_rank"),
             ("lora", "rank"), ("lora", "alpha"), ("scardnft", "group_size"),
             ("scardnft", "beta"), ("scardnft", "adv_clip_max"), ("scardnft", "train_timesteps"),
             ("refiner", "hidden"), ("refiner", "band_mm"), ("refiner", "quick_plan_samples"),
             ("refiner", "quick_plan_max_iter")}
_NON_NEGATIVE = {("run", "seed"), ("run", "threads"), ("model", "dit_dim"), ("model", "dit_layers"),
                 ("model", "dit_heads"), ("model", "dit_ffn_dim"), ("optim", "weight_decay"),
                 ("optim", "warmup_steps"), ("optim", "decay_steps"), ("optim", "grad_clip"),
                 ("data", "val_cases"),
                 ("data", "shift_voxels"), ("data", "crop"), ("vae_adapt", "loss_weight"),
                 ("scardnft", "kl_weight"), ("scardnft", "scorecard_weight"),
                 ("scardnft", "mae_weight"), ("beam_pairs", "weight")}
_FRACTIONS = {("data", "val_fraction"), ("any2any", "target_prob"),
              ("any2any", "dose_target_prob")}


def presets_dir() -> Path:
    return resources_dir() / "presets"


def resolve_preset(name_or_path: str) -> Path:
    """A preset file from a path or the stem of a shipped preset (``paper``, ``cpu-small``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = presets_dir() / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in presets_dir().glob("*.toml"))
    raise ConfigError(f"preset {name_or_path!r} not found: not a file, and not one of the shipped "
                      f"presets ({', '.join(known) or 'none'})")


def load_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
    """Read and validate a preset (see the module docstring); ConfigError on any problem.

    ``overrides`` are ``section.key=value`` strings (``--set`` on the command line) applied on
    top of the file; ``value`` is read as a TOML value (``3``, ``1e-4``, ``true``, ``[1, 2]``),
    or as a plain string when it is not one.
    """
    path = resolve_preset(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (sep and dot and section and name):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. "
                              "run.max_steps=200")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item!r}: [{section}] is not a table in {path}")
        table[name] = value
    source = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    return config_from_dict(raw, source=source)


def config_from_dict(raw: dict, source: str = "<dict>") -> TrainConfig:
    """Build a validated TrainConfig from nested plain values (as TOML gives them)."""
    sections = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "source"}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(sections)}")
    built = {}
    for name, f in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
        built[name] = _build_section(name, f.default_factory, table, source)
    cfg = TrainConfig(**built, source=source)
    _check_relations(cfg)
    return cfg


def _build_section(section: str, cls: type, table: dict, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [{section}]: "
                          f"{', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(fields))}")
    values = {}
    for key, value in table.items():
        where = f"{source}: [{section}] {key}"
        value = _coerce(value, hints[key], where)
        _check_range(section, key, value, where)
        values[key] = value
    return cls(**values)


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {hint}")  # programming error, not user input
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")


def _check_range(section: str, key: str, value, where: str) -> None:
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(repr, choices))}")
    items = value if isinstance(value, tuple) else (value,)
    if (section, key) in _POSITIVE and any(v <= 0 for v in items):
        raise ConfigError(f"{where} must be > 0, got {value!r}")
    if (section, key) in _NON_NEGATIVE and any(v < 0 for v in items):
        raise ConfigError(f"{where} must be >= 0, got {value!r}")
    if (section, key) in _FRACTIONS and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} must be within [0, 1], got {value!r}")


def _check_relations(cfg: TrainConfig) -> None:
    src = cfg.source
    b1, b2 = cfg.optim.betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"{src}: [optim] betas must lie in [0, 1), got {cfg.optim.betas}")
    if cfg.data.val_fraction >= 1.0:
        raise ConfigError(f"{src}: [data] val_fraction must be < 1 to leave training cases")
    z, y, x = cfg.data.grid
    if min(cfg.data.grid) <= 0 or (z - 1) % 4 or y % 8 or x % 8:
        raise ConfigError(f"{src}: [data] grid {cfg.data.grid} must be (4k+1, 8m, 8n) voxels for "
                          f"the causal VAE (the paper's is (97, 128, 160))")
    crop = cfg.data.crop
    if any(crop) and (min(crop) <= 0 or (crop[0] - 1) % 4 or crop[1] % 8 or crop[2] % 8
                      or any(c > g for c, g in zip(crop, cfg.data.grid))):
        raise ConfigError(f"{src}: [data] crop {crop} must be (0, 0, 0) or (4k+1, 8m, 8n) voxels "
                          f"no larger than the grid {cfg.data.grid}")
    if cfg.scardnft.train_timesteps > cfg.diffusion.sample_steps:
        raise ConfigError(f"{src}: [scardnft] train_timesteps ({cfg.scardnft.train_timesteps}) "
                          f"cannot exceed [diffusion] sample_steps ({cfg.diffusion.sample_steps})")
    if cfg.scardnft.group_size < 2:
        raise ConfigError(f"{src}: [scardnft] group_size must be >= 2: advantages are "
                          "normalised within each case's group of rollouts")
