"""The training loop shared by every stage (nanoGPT style: one readable function).

A stage builds a :class:`Task` (model, trainable parameters, training items, a loss over a list
of items) and hands it to :func:`run`, which owns everything else: Adam with linear warm-up then
a constant lr, grad clipping, bf16 autocast on CUDA only, DDP, periodic validation, atomic
checkpoints, exact resume, the event log and a progress bar on a terminal.

Stopping: SIGTERM or SIGINT (the GUI's Cancel, Ctrl-C, a cluster's pre-emption notice) asks the
run to stop after the current step: it saves a checkpoint, logs an ``end`` event with status
``stopped`` and raises :class:`TrainingStopped`, so ``--resume`` continues exactly there. A
second signal interrupts at once.

Determinism: every random draw of a training step comes from generators derived from
``(seed, step, index of the sample in the global batch)``, and the data order of epoch ``e``
is a permutation seeded by ``(seed, e)``. A step's samples, noises and augmentations therefore
depend on neither the number of processes nor on whether the run was resumed: a resumed run
repeats the uninterrupted one, and N processes with a global batch B compute what one process
with the same B computes (up to floating-point summation order).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.errors import UserError

from . import checkpointing as ckpt
from .config import TrainConfig
from .distributed import DistContext, all_gather_tensor, all_reduce_mean, barrier
from .events import EventLog

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """The run stopped on a signal after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at step {step}; a "
                         "checkpoint was saved: continue with --resume")
        self.step, self.signum = step, signum


class StopRequest:
    """While entered (main thread only), SIGTERM/SIGINT set ``signum`` instead of killing the
    process; a second signal restores the previous handler and raises it again."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to "
                    "stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

LossFn = Callable[[nn.Module, list[Any], list[torch.Generator]], tuple[torch.Tensor, dict]]


@dataclass
class Task:
    """What a stage trains. See the module docstring for the contract of ``loss``.

    Attributes:
        stage: the stage name (recorded in events and checkpoints).
        model: the module whose state is checkpointed; called through DDP in ``loss``.
        params: the parameters Adam updates (the rest of ``model`` stays frozen).
        train_items: indexable training items (anything the loss understands).
        loss: ``loss(model, items, generators) -> (scalar mean loss, {name: float})`` over this
            rank's share of the global batch, with one seeded generator per item.
        evaluate: ``evaluate(model, items) -> {metric: mean over items}`` on validation items
            (this rank's share); None for no validation.
        val_items: the validation items.
        after_step: called with the new step count after every optimizer step (e.g. the
            old-policy soft update of ScardNFT).
        extra_state / load_extra_state: tensors besides ``model`` that change during training.
        export: writes the final artefact into the run folder, returns its path (rank 0 only).
        data_signature: identifies the training items, so a resume on other data is refused.
        use_ddp: wrap ``model`` in DDP when distributed (else gradients are all-reduced here).
        find_unused: some parameters may get no gradient in a step (e.g. the output heads of
            slots that are not targets): DDP must look for them.
    """

    stage: str
    model: nn.Module
    params: list[nn.Parameter]
    train_items: Sequence[Any]
    loss: LossFn
    evaluate: Callable[[nn.Module, Sequence[Any]], dict[str, float]] | None = None
    val_items: Sequence[Any] = ()
    after_step: Callable[[int], None] | None = None
    extra_state: Callable[[], dict[str, torch.Tensor]] = dict
    load_extra_state: Callable[[dict[str, torch.Tensor]], None] = lambda state: None
    export: Callable[[Path], Path] | None = None
    data_signature: str = ""
    use_ddp: bool = True
    find_unused: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` then constant (seed §B.7), and with ``decay_steps``
    a linear fall to 0 over the last that many steps of ``max_steps`` (a warm-up, stable, decay
    schedule: the decay can start from any checkpoint of the constant phase, e.g. a finished
    run resumed with more steps). ``step`` counts from 0."""
    warm, decay, total = cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.run.max_steps
    scale = 1.0
    if warm and step < warm:
        scale = (step + 1) / warm
    if decay and step >= total - decay:
        scale = min(scale, max(total - step, 0) / decay)
    return cfg.optim.lr * scale


def sample_generator(seed: int, step: int, index: int, device: torch.device | str = "cpu"
                     ) -> torch.Generator:
    """The generator for sample ``index`` of the global batch of ``step``."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the ``n`` training items."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(seed: int, step: int, batch: int, n: int) -> list[int]:
    """Item indices of the global batch of ``step`` (epochs wrap around)."""
    out, orders = [], {}
    for j in range(batch):
        g = step * batch + j
        epoch, pos = divmod(g, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n)
        out.append(orders[epoch][pos])
    return out


def data_signature(names: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(names).encode(), digest_size=12).hexdigest()


def check_fits(cfg: TrainConfig, ctx: DistContext, n_train: int) -> None:
    """Refuse, before any compute, a batch that does not split over the processes or data."""
    if cfg.data.batch_size % ctx.world_size:
        raise UserError(f"[data] batch_size {cfg.data.batch_size} (global) must be divisible by "
                        f"the number of processes ({ctx.world_size})")
    if n_train == 0:
        raise UserError("the dataset has no training cases")


def prepare_resume(run_dir: Path, resume: bool, task: Task, cfg: TrainConfig,
                   ctx: DistContext) -> ckpt.Checkpoint | None:
    """Find and check the checkpoint to resume from (before any compute), or refuse to clobber."""
    if not resume:
        return None
    found = ckpt.find_latest(run_dir)
    if found is None:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint in "
                                   f"{ckpt.checkpoint_dir(run_dir)}")
    m = found.manifest
    problems = []
    if m.get("stage") != task.stage:
        problems.append(f"it is from stage {m.get('stage')!r}, not {task.stage!r}")
    if m.get("model_signature") != ckpt.model_signature(task.model):
        problems.append("its model architecture (parameter names/shapes) differs from the "
                        "preset's")
    if m.get("data_signature") != task.data_signature:
        problems.append("it was trained on a different list of training cases")
    if m.get("global_batch") != cfg.data.batch_size or m.get("seed") != cfg.run.seed:
        problems.append(f"its global batch/seed ({m.get('global_batch')}, {m.get('seed')}) "
                        f"differ from the preset's ({cfg.data.batch_size}, {cfg.run.seed})")
    if problems:
        raise ckpt.CheckpointError(f"cannot resume from {found.tensors_path}: "
                                   + "; ".join(problems))
    if found.step >= cfg.run.max_steps:
        log.info("checkpoint step %d already reaches max_steps %d", found.step,
                 cfg.run.max_steps)
    return found


def run(task: Task, cfg: TrainConfig, run_dir: Path, ctx: DistContext, resume: bool = False,
        progress: bool | None = None) -> dict:
    """Train ``task`` to ``cfg.run.max_steps``; returns the last train/eval metrics."""
    run_dir = Path(run_dir)
    if not resume and ckpt.has_any_checkpoint(run_dir):
        raise UserError(f"{run_dir} already holds a training run; pass --resume to continue "
                        "it or choose another --out")
    events = EventLog(run_dir, enabled=ctx.is_main)
    try:
        check_fits(cfg, ctx, len(task.train_items))
        start_ckpt = prepare_resume(run_dir, resume, task, cfg, ctx)
        barrier(ctx)
        with StopRequest() as stop:
            return _train(task, cfg, run_dir, ctx, start_ckpt, events, progress, stop)
    except TrainingStopped:
        raise
    except BaseException as exc:
        try:
            events.emit("error", _last_step(run_dir), message=str(exc) or type(exc).__name__,
                        error_type=type(exc).__name__)
        except OSError as log_exc:  # e.g. the same full disk: the run's own error comes first
            log.warning("could not record the error in the event log: %s", log_exc)
        exc.logged = True  # the CLI must not log it twice
        raise
    finally:
        events.close()


def _last_step(run_dir: Path) -> int:
    found = ckpt.find_latest(run_dir)
    return found.step if found else 0


def _train(task: Task, cfg: TrainConfig, run_dir: Path, ctx: DistContext,
           start: ckpt.Checkpoint | None, events: EventLog, progress: bool | None,
           stop: StopRequest) -> dict:
    model, params = task.model.to(ctx.device), task.params
    opt = torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                           weight_decay=cfg.optim.weight_decay)
    step = 0
    torch.manual_seed(cfg.run.seed + ctx.rank)
    if start is not None:
        tensors = start.load_tensors()
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                               if k.startswith("model.")}, strict=True)
        ckpt.restore_optimizer(opt, start.manifest, tensors)
        task.load_extra_state({k[len("extra."):]: v for k, v in tensors.items()
                               if k.startswith("extra.")})
        ckpt.restore_global_rng(start.manifest, tensors, ctx.rank)
        step = start.step
    ddp = task.use_ddp and ctx.distributed
    train_model = (DistributedDataParallel(model, device_ids=[ctx.device.index]
                                           if ctx.device.type == "cuda" else None,
                                           find_unused_parameters=task.find_unused)
                   if ddp else model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda"
                else nullcontext())
    total, batch, n = cfg.run.max_steps, cfg.data.batch_size, len(task.train_items)
    local = batch // ctx.world_size
    events.emit("start", step, stage=task.stage, total_steps=total, world_size=ctx.world_size,
                device=str(ctx.device), resumed=start is not None, config=cfg.to_dict(),
                train_cases=n, val_cases=len(task.val_items), **task.info)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = _progress_bar(show and ctx.is_main, step, total, task.stage)
    t_run, last = time.time(), {}
    t_log, samples_since = time.time(), 0
    while step < total:
        model.train()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        indices = global_batch_indices(cfg.run.seed, step, batch, n)
        mine = range(ctx.rank * local, (ctx.rank + 1) * local)
        items = [task.train_items[indices[j]] for j in mine]
        gens = [sample_generator(cfg.run.seed, step, j) for j in mine]
        with autocast:
            loss, metrics = task.loss(train_model, items, gens)
        if not _finite_everywhere(loss, ctx):
            raise FloatingPointError(f"the loss became non-finite at step {step + 1}: training "
                                     "diverged (lower [optim] lr or check the data)")
        loss.backward()
        if ctx.distributed and not ddp:
            _all_reduce_grads(params, ctx)
        grad_norm = _clip(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if task.after_step is not None:
            task.after_step(step)
        samples_since += batch
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            now = time.time()
            metrics = all_reduce_mean({"loss": loss.item(), "grad_norm": grad_norm,
                                       **{k: float(v) for k, v in metrics.items()}}, ctx)
            last = dict(metrics, lr=lr, samples_per_s=samples_since / max(now - t_log, 1e-9))
            events.emit("train", step, total_steps=total, **last)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.2g}")
            t_log, samples_since = now, 0
        if task.evaluate is not None and task.val_items and (
                step % cfg.run.eval_every == 0 or step == total):
            scores = _evaluate(task, model, cfg, ctx)
            events.emit("eval", step, total_steps=total, **scores)
            last.update(scores)
        signum = _agreed_signal(stop.signum, ctx)
        if step % cfg.run.checkpoint_every == 0 or step == total or signum:
            path = _save(task, model, opt, cfg, run_dir, ctx, step)
            events.emit("checkpoint", step, path=str(path) if path else None)
        if signum and step < total:
            bar.close()
            events.emit("end", step, total_steps=total, status="stopped", export=None,
                        wall_s=time.time() - t_run)
            raise TrainingStopped(step, signum)
    bar.close()
    exported = task.export(run_dir) if (task.export is not None and ctx.is_main) else None
    barrier(ctx)
    events.emit("end", step, total_steps=total, status="completed", export=exported,
                wall_s=time.time() - t_run)
    return last


def _agreed_signal(signum: int, ctx: DistContext) -> int:
    """The stop signal if any rank received one (all ranks stop at the same step)."""
    if not ctx.distributed:
        return signum
    import torch.distributed as dist
    value = torch.tensor([signum], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _finite_everywhere(loss: torch.Tensor, ctx: DistContext) -> bool:
    """Whether the loss is finite on every rank (all ranks stop together otherwise)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=ctx.device)
    if ctx.distributed:
        import torch.distributed as dist
        dist.all_reduce(bad)
    return bad.item() == 0.0


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def _all_reduce_grads(params: list[nn.Parameter], ctx: DistContext) -> None:
    import torch.distributed as dist
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= ctx.world_size


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> dict:
    model.eval()
    items = list(task.val_items)
    if cfg.data.val_cases:
        items = items[:cfg.data.val_cases]
    mine = items[ctx.rank::ctx.world_size]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda"
                else nullcontext())
    with autocast:
        scores = task.evaluate(model, mine) if mine else {}
    # weight each rank's means by its item count, so the result is the mean over all items
    keys = sorted(scores) if scores else []
    keys = _agree_on_keys(keys, ctx)
    sums = torch.tensor([scores.get(k, 0.0) * len(mine) for k in keys] + [len(mine)],
                        dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        import torch.distributed as dist
        dist.all_reduce(sums)
    count = max(sums[-1].item(), 1.0)
    return {k: sums[i].item() / count for i, k in enumerate(keys)}


def _agree_on_keys(keys: list[str], ctx: DistContext) -> list[str]:
    if not ctx.distributed:
        return keys
    import torch.distributed as dist
    gathered: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, keys)
    return sorted({k for ks in gathered for k in (ks or [])})


def _save(task: Task, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
          run_dir: Path, ctx: DistContext, step: int) -> Path | None:
    rng = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    rng_tensors = {}
    for name, state in rng.items():
        for r, t in enumerate(all_gather_tensor(state.to(ctx.device), ctx)):
            rng_tensors[f"{name}.rank{r}"] = t.cpu()
    path = None
    if ctx.is_main:
        n = len(task.train_items)
        seen = step * cfg.data.batch_size
        meta = {"stage": task.stage, "seed": cfg.run.seed, "global_batch": cfg.data.batch_size,
                "world_size": ctx.world_size, "data_signature": task.data_signature,
                "data_order": {"epoch": seen // n, "position": seen % n, "samples_seen": seen},
                "lr": lr_at(max(step - 1, 0), cfg), "config": cfg.to_dict()}
        path = ckpt.save_checkpoint(run_dir, step, model=model, optimizer=opt,
                                    extra=task.extra_state(), rng_tensors=rng_tensors, meta=meta,
                                    keep=cfg.run.keep_checkpoints)
    barrier(ctx)
    return path


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(show: bool, step: int, total: int, stage: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=step, desc=stage, unit="step", dynamic_ncols=True)
