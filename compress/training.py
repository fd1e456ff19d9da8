"""Phase 1: the training loop (SGD with Nesterov momentum, step or cosine schedule, per-group
learning rates), with a checkpoint every epoch and exact resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from compress.progress import tqdm

from compress import accel, distributed
from compress.checks import integer, number, one_of
from compress.checks import seed as check_seed
from compress.config import to_dict
from compress.data import DataBundle, ImageSet, iterate_batches
from compress.distill import DistillConfig, check_outputs, distillation_loss
from compress.errors import OptionError, UserError, clip, shorten
from compress.io import atomic_torch_save, atomic_write_text
from compress.models.factory import read_checkpoint, state_mismatch
from compress.models.introspect import non_finite
from compress.models.meta import parse_meta

__all__ = ["TrainConfig", "DistillConfig", "fit", "evaluate", "default_device", "param_groups"]

CHECKPOINT = "checkpoint.pt"
MAX_LR = 1000.0  # beyond it SGD's arithmetic overflows float32 rather than training


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of training (phase 1) and of fine-tuning; the papers' tables give one set
    per architecture. SGD with Nesterov momentum and L2 weight decay, linear layers ("fc") and the
    others ("conv") in separate parameter groups.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per optimiser step (the global batch under torchrun).
        lr: learning rate of the conv (non-linear) layers.
        momentum: Nesterov momentum of the conv layers.
        weight_decay: L2 weight decay of the conv layers.
        lr_fc: learning rate of the linear layers (default: lr).
        momentum_fc: momentum of the linear layers (default: momentum).
        weight_decay_fc: weight decay of the linear layers (default: weight_decay).
        schedule: step (lr x lr_decay every lr_step epochs), cosine, or onecycle.
        lr_decay: q, the factor of the step schedule.
        lr_step: dt, epochs between two decays of the step schedule.
        augment: random flips and 4-pixel translations of the training images.
        amp: mixed precision: true (float16 autocast with loss scaling on CUDA, float32 elsewhere), false
            (float32), bf16 (bfloat16 autocast without loss scaling, on CUDA and on the CPU), or fp16 (float16
            with loss scaling; CUDA only: refused on another device, where true is the portable setting).
        channels_last: hold the model and the batches in the channels-last memory format while training
            (faster convolutions with mixed precision on recent GPUs); checkpoints are saved as usual.
        compile: torch.compile the model for training (inductor: needs a C++ compiler on the CPU and
            Triton on CUDA, and a machine without them stops with an error; the first steps are slow while
            it compiles); checkpoints keep their keys.
        seed: initial weights, shuffling and augmentation.
        lr_factors: learning-rate factor per module prefix, e.g. {blocks: 0.1, classifier: 1.0}.
        distill: fine-tune with the original model as teacher, e.g. {temperature: 4, alpha: 0.9}:
            loss (1 - alpha) CE + alpha T^2 KL(softmax(teacher/T), softmax(student/T)), the teacher's
            logits on the same augmented batch (defaults temperature 4, alpha 0.9; alpha 0 is plain
            fine-tuning). Recipe fine-tuning only (training from scratch has no teacher).
    """

    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.028
    momentum: float = 0.975
    weight_decay: float = 1.5e-3
    lr_fc: float | None = None
    momentum_fc: float | None = None
    weight_decay_fc: float | None = None
    schedule: Literal["step", "cosine", "onecycle"] = "step"
    lr_decay: float = 0.6
    lr_step: int = 20
    augment: bool = True
    amp: bool | Literal["bf16", "fp16"] = True
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    lr_factors: dict[str, float] = field(default_factory=dict)
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        one_of("schedule", self.schedule, ("step", "cosine", "onecycle"))
        integer("epochs", self.epochs, low=1, high=1_000_000, hint="passes over the training split")
        integer("batch_size", self.batch_size, low=1, high=1_000_000, hint="images per optimiser step")
        number("lr", self.lr, low=0, high=MAX_LR, low_open=True, hint="the learning rate, e.g. 0.01")
        nesterov = "SGD with Nesterov momentum needs a momentum in (0, 1), e.g. 0.9"
        number("momentum", self.momentum, low=0, high=1, low_open=True, high_open=True, hint=nesterov)
        number("weight_decay", self.weight_decay, low=0, high=1, hint="L2 weight decay, 0 for none")
        if self.lr_fc is not None:
            number("lr_fc", self.lr_fc, low=0, high=MAX_LR, low_open=True,
                   hint="the learning rate of the linear layers (leave it out: lr)")
        if self.momentum_fc is not None:
            number("momentum_fc", self.momentum_fc, low=0, high=1, low_open=True, high_open=True, hint=nesterov)
        if self.weight_decay_fc is not None:
            number("weight_decay_fc", self.weight_decay_fc, low=0, high=1, hint="L2 weight decay, 0 for none")
        number("lr_decay", self.lr_decay, low=0, high=1, low_open=True, hint="the factor of the step schedule")
        integer("lr_step", self.lr_step, low=1, hint="epochs between two decays of the step schedule")
        accel.check_amp("amp", self.amp)
        for key in ("channels_last", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(key, f"{shorten(getattr(self, key))}: expected true or false")
        check_seed("seed", self.seed)
        for prefix, factor in (self.lr_factors or {}).items():
            number(f"lr_factors.{clip(str(prefix), 60)}", factor, low=0, high=MAX_LR,
                   hint="a learning-rate factor per module prefix, e.g. {blocks: 0.1} (0 freezes)")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise OptionError("distill", f"{shorten(self.distill)}: expected a DistillConfig (a mapping "
                                         f"{{temperature: 4, alpha: 0.9}} in a recipe) or none")

    def train_options(self) -> dict[str, Any]:
        """The fields of :class:`TrainConfig` alone (a subclass may add its own), as plain values."""
        return {f.name: to_dict(getattr(self, f.name)) for f in fields(TrainConfig)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups: ``nn.Linear`` parameters ("fc") apart from all others ("conv"), each
    split further by the learning-rate factor of ``cfg.lr_factors`` (longest matching module
    prefix; e.g. ``{"blocks": 0.1, "classifier": 1.0}``, the second paper's per-stage factors).
    A module that declares ``param_group = "fc"`` counts as "fc" too (an AFCC
    :class:`~compress.compression.afcc.SparseHead`: a linear layer with most of its weights gone)."""
    fc_ids = {id(p) for m in model.modules() if isinstance(m, nn.Linear) or getattr(m, "param_group", None) == "fc"
              for p in m.parameters(recurse=False)}
    factors = dict(cfg.lr_factors or {})
    groups: dict[tuple[str, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [k for k in factors if name == k or name.startswith(k + ".")]
        factor = factors[max(hits, key=len)] if hits else 1.0
        groups.setdefault(("fc" if id(p) in fc_ids else "conv", factor), []).append(p)
    out = []
    for (kind, factor), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != "conv", -kv[0][1])):
        lr = cfg.lr if kind == "conv" or cfg.lr_fc is None else cfg.lr_fc
        fc = kind == "fc"
        out.append({"name": kind if factor == 1.0 else f"{kind}x{factor:g}", "params": params, "lr": lr * factor,
                    "momentum": cfg.momentum_fc if fc and cfg.momentum_fc is not None else cfg.momentum,
                    "weight_decay": cfg.weight_decay_fc if fc and cfg.weight_decay_fc is not None else cfg.weight_decay})
    return out


def _train_mode(model: nn.Module) -> None:
    """Training mode, except batch-norm layers whose parameters are frozen: their running
    statistics stay as they are, so fine-tuning a head alone leaves the trunk unchanged."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _lr_factor(cfg: TrainConfig, epoch: float) -> float:
    """Learning-rate multiplier at (fractional) ``epoch``: step (q every dt), cosine, or one-cycle
    (linear warm-up from 1/25 over the first 30 %, then cosine annealing to 1/10,000)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "onecycle":
        t = epoch / cfg.epochs
        if t < 0.3:
            return 1 / 25 + (1 - 1 / 25) * t / 0.3
        return 1e-4 + (1 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * (t - 0.3) / 0.7))
    return cfg.lr_decay ** (int(epoch) // cfg.lr_step)


@torch.inference_mode()
def evaluate(model: nn.Module, bundle: DataBundle, split: ImageSet | None = None, batch_size: int = 500,
             device: torch.device | None = None, *, channels_last: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (default: the test split), in float32; with
    ``channels_last`` the batches are fed channels-last (for a model held so, see
    :attr:`TrainConfig.channels_last`).

    Under ``torchrun`` each process counts a contiguous block of the split and the counts are
    summed: every process must call it, and all get the same answer.
    """
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    split = bundle.test if split is None else split
    start, stop = distributed.shard_range(len(split), batch_size)
    correct = torch.zeros((), dtype=torch.float64)
    for x, y in iterate_batches(bundle, split, batch_size, device=device, order=torch.arange(start, stop)):
        correct += (model(accel.channels_last(x) if channels_last else x).argmax(1) == y).sum().item()
    model.train(was)
    return distributed.all_reduce_sum(correct).item() / max(1, len(split))


def fit(model: nn.Module, bundle: DataBundle, cfg: TrainConfig, out_dir: str | Path, *,
        meta: dict[str, Any] | None = None, resume: bool = True, device: torch.device | None = None,
        progress: bool = True, after_step=None, started: Callable[[], None] | None = None,
        teacher: nn.Module | None = None) -> list[dict[str, float]]:
    """Train ``model`` on ``bundle.train``, checkpointing to ``out_dir/checkpoint.pt`` after every epoch.

    A run started again with the same ``out_dir`` resumes after the last finished epoch; shuffling
    and augmentation are seeded per epoch, so a resumed run ends where an uninterrupted one would.

    Under ``torchrun`` with several processes the model is wrapped in ``DistributedDataParallel``.
    ``cfg.batch_size`` stays the global batch: each of the W processes takes
    ``batch_size // W`` samples per step from its shard of the epoch's permutation
    (:func:`compress.distributed.shard_indices`), so the learning rates mean the same at any W.
    Rank 0 writes the checkpoint and the history; every rank resumes from the same checkpoint
    (on storage all nodes share). The weights saved are the unwrapped model's.

    The GPU settings of ``cfg`` (:mod:`compress.accel`): ``amp`` picks the autocast dtype (the
    teacher runs under the same one; float16 alone uses a gradient scaler). With ``channels_last``
    the model (not the teacher) is held channels-last for the run and handed back, and saved, in
    the usual contiguous format. With ``compile`` the module trained is ``torch.compile(model)``,
    compiled before the ``DistributedDataParallel`` wrapping (PyTorch's advice: compile the inner
    module); it shares the model's parameters, and the checkpoints hold ``model.state_dict()``, so
    their keys do not change. The accuracy of each epoch is measured on the model uncompiled, in
    float32.

    Args:
        model: the network (moved to ``device``).
        bundle: the data; its ``test`` split gives the accuracy logged each epoch, under the key
            ``<bundle.eval_split>_acc`` (``val_acc`` for :meth:`~compress.data.DataBundle.for_choices`).
        cfg: hyper-parameters.
        out_dir: folder for ``checkpoint.pt`` and ``history.json``.
        meta: JSON-able description stored in the checkpoint (model name and options, labels).
        resume: continue from an existing checkpoint.
        device: defaults to CUDA when present.
        progress: show a progress bar.
        after_step: optional ``callable(model)`` run after every optimiser step (e.g. re-applying masks).
        started: optional ``callable()`` run once the checkpoint to resume from was read and
            checked, before anything is written (e.g. writing the run's settings).
        teacher: the teacher of ``cfg.distill`` (needed when its alpha is above 0; ignored
            otherwise): put in eval mode and on ``device``, run without gradients on every
            augmented batch under the same autocast. With alpha 0 it is never run, and the
            result equals fine-tuning without ``distill`` bit for bit.

    Returns:
        One dict per epoch: ``epoch``, ``lr``, ``loss``, ``train_acc``, ``val_acc`` or ``test_acc``, ``seconds``.

    Raises:
        UserError: the checkpoint to resume from is damaged, carries code or is of another model;
            ``cfg.distill`` without a teacher, or a teacher with other outputs than the model;
            or the loss or the weights stopped being finite (the run stops before saving that
            epoch, so the last good checkpoint is kept); ``compile`` on a machine whose torch.compile
            cannot compile (no C++ compiler, no Triton): one line, on the first step, before anything
            of the epoch is saved.
        OptionError: ``amp`` fp16 on a device other than CUDA (raised before any work).
    """
    out_dir = Path(out_dir)
    device = device or default_device()
    dtype = accel.amp_dtype(cfg.amp, device)  # None: float32; fp16 off CUDA is refused here, before any work
    distill = cfg.distill if cfg.distill is not None and cfg.distill.alpha > 0 else None
    if distill is not None and teacher is None:
        raise UserError("distill: distillation needs a teacher (the original model), which only the fine-tuning "
                        "of a recipe has (finetune: {distill: {...}}); training a model from scratch cannot distill")
    model.to(device)
    if distill is not None:
        teacher.to(device).eval()
    with accel.channels_last_module(model, enabled=cfg.channels_last):
        torch.manual_seed(cfg.seed)
        groups = param_groups(model, cfg)
        base_lrs = [g["lr"] for g in groups]
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        scaler = accel.grad_scaler(dtype, device)
        ckpt_path = out_dir / CHECKPOINT
        history = _resume(model, opt, ckpt_path, device) if resume else []
        if started is not None:
            started()
        net, batch_size = _parallel(accel.compile_module(model) if cfg.compile else model, cfg, device)
        progress = progress and distributed.is_main()
        for epoch in range(len(history), cfg.epochs):
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * _lr_factor(cfg, epoch)
            t0 = time.perf_counter()
            step = _Step(net, model, opt, scaler, base_lrs, cfg, dtype, after_step, teacher if distill else None)
            try:
                seen, loss_sum, correct = _train_epoch(step, bundle, batch_size, epoch, device, progress)
            except FloatingPointError as e:
                raise _diverged(cfg, epoch, f"the loss became {e.args[0]}", ckpt_path, len(history)) from None
            bad = non_finite(model)
            if bad or not math.isfinite(loss_sum):
                what = f"the weights of {', '.join(bad[:3])} became" if bad else "the loss became"
                raise _diverged(cfg, epoch, f"{what} NaN or infinite", ckpt_path, len(history))
            acc = evaluate(model, bundle, device=device, channels_last=cfg.channels_last)
            split = bundle.eval_split
            history.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "loss": loss_sum / seen,
                            "train_acc": correct / seen, f"{split}_acc": acc, "seconds": time.perf_counter() - t0})
            if progress:
                h = history[-1]
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {h['loss']:.4f}  train {h['train_acc']:.4f}  "
                           f"{split} {acc:.4f}  ({h['seconds']:.1f} s)")
            if distributed.is_main():
                weights = {k: v.contiguous() for k, v in model.state_dict().items()} if cfg.channels_last \
                    else model.state_dict()
                atomic_torch_save({"model": weights, "optimizer": opt.state_dict(), "epoch": epoch,
                                   "history": json.dumps(history), "config": json.dumps(cfg.train_options()),
                                   "meta": json.dumps(meta or {})}, ckpt_path)
                atomic_write_text(out_dir / "history.json", json.dumps(history, indent=2))
            distributed.barrier()
        return history


def _diverged(cfg: TrainConfig, epoch: int, what: str, path: Path, finished: int) -> UserError:
    """The error of a run whose loss or weights stopped being finite in ``epoch`` (0-based)."""
    kept = (f"the checkpoint of epoch {finished} ({str(path)!r}) is kept" if finished
            else "no checkpoint was written")
    return UserError(f"training diverged in epoch {epoch + 1}: {what}; {kept}. Lower the learning rate "
                     f"(lr {cfg.lr:g}) or check the data and its normalisation (mean, std)")


def _resume(model: nn.Module, opt: torch.optim.Optimizer, path: Path, device: torch.device) -> list[dict[str, float]]:
    """Load the model and optimiser state of ``path`` when every process sees it; the history so far.

    The checkpoint is untrusted (it is whatever the run folder holds): a damaged file, one of
    another model, or one carrying code is a :class:`UserError` that suggests ``--no-resume``.
    """
    if not _checkpoint_visible(path, distributed.world_size()):
        return []
    again = "pass --no-resume to start again, or choose another --out"
    state, history = _load_training_state(path, device, again)
    problem = state_mismatch(model.state_dict(), state["model"])
    if problem:
        raise UserError(f"the run folder's checkpoint {str(path)!r} was saved for another model ({problem}); {again}")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"the run folder's checkpoint {str(path)!r} does not fit this model and its optimiser "
                        f"({type(e).__name__}: {clip(str(e), 120)}); {again}") from None
    return history


def _load_training_state(path: Path, device: torch.device, again: str) -> tuple[dict[str, Any], list[dict]]:
    """The checkpoint mapping and its history, checked to be what :func:`fit` writes."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        text = str(e).strip()
        why = ("carries pickled code and was refused" if "weights_only" in text or "Unsupported global" in text
               else f"cannot be read ({clip(text.splitlines()[0] if text else type(e).__name__, 120)}); it is "
                    f"truncated or damaged")
        raise UserError(f"the run folder's checkpoint {str(path)!r} {why}; {again}") from None
    fields_ok = (isinstance(state, dict) and isinstance(state.get("model"), dict)
                 and isinstance(state.get("optimizer"), dict) and isinstance(state.get("history"), str)
                 and isinstance(state.get("epoch"), int) and not isinstance(state.get("epoch"), bool))
    if not fields_ok:
        raise UserError(f"{str(path)!r} is not a training checkpoint of compress (no model, optimizer, epoch and "
                        f"history); {again}")
    try:
        history = json.loads(state["history"])
    except ValueError:
        history = None
    if (not isinstance(history, list) or not all(isinstance(h, dict) for h in history)
            or len(history) != state["epoch"] + 1):
        raise UserError(f"{str(path)!r} is inconsistent (epoch {shorten(state['epoch'])}, its history is not one row "
                        f"per finished epoch); {again}")
    return state, history


def _parallel(model: nn.Module, cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, int]:
    """The module to call (``DistributedDataParallel`` under torchrun) and the per-process batch size."""
    world = distributed.world_size()
    if world == 1:
        return model, cfg.batch_size
    if cfg.batch_size < world:
        raise UserError(f"batch size {cfg.batch_size} is smaller than the {world} processes; use at least {world}")
    if not any(p.requires_grad for p in model.parameters()):
        return model, cfg.batch_size // world
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False), cfg.batch_size // world


@dataclass
class _Step:
    """What one optimiser step needs."""

    net: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lrs: list[float]
    cfg: TrainConfig
    dtype: torch.dtype | None  # of autocast (None: float32)
    after_step: Any
    teacher: nn.Module | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.schedule != "step":  # smooth schedules move every step
            for g, lr in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = lr * _lr_factor(self.cfg, epoch)
        if self.cfg.channels_last:
            x = accel.channels_last(x)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.net(x)
            if self.teacher is None:
                loss = F.cross_entropy(logits, y)
            else:  # the teacher reads the same augmented batch; eval mode, so it draws no random numbers
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                check_outputs(logits, teacher_logits)
                loss = distillation_loss(logits, teacher_logits, y, self.cfg.distill)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step(self.model)
        return loss, logits


def _train_epoch(step: _Step, bundle: DataBundle, batch_size: int, epoch: int, device: torch.device,
                 progress: bool) -> tuple[float, float, float]:
    """One pass over the training split; returns (images seen, summed loss, correct) over all processes."""
    cfg, world = step.cfg, distributed.world_size()
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    order = None
    if world > 1:  # the same permutation everywhere, one shard each; augmentation differs per rank
        order = distributed.shard_indices(len(bundle.train), cfg.seed * 100003 + epoch)
        gen = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) * 1009 + distributed.rank())
    _train_mode(step.net)
    seen, loss_sum, correct = 0, 0.0, 0
    batches = iterate_batches(bundle, bundle.train, batch_size, shuffle=True, augmented=cfg.augment,
                              generator=gen, device=device, order=order)
    steps_per_epoch = max(1, math.ceil((len(bundle.train) if order is None else len(order)) / batch_size))
    bar = tqdm(batches, total=steps_per_epoch, disable=not progress,
               desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        try:
            loss, logits = step(x, y, epoch + i / steps_per_epoch)
        except accel.COMPILE_ERRORS as e:  # torch.compile compiles on the first call (and on a new batch shape)
            raise accel.compile_failure(e) from None
        value = loss.item()
        if world == 1 and not math.isfinite(value):  # several processes stop together, after the epoch
            raise FloatingPointError(value)
        seen += len(y)
        loss_sum += value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    if world > 1:  # the epoch's figures over all processes
        seen, loss_sum, correct = distributed.all_reduce_sum(
            torch.tensor([seen, loss_sum, correct], dtype=torch.float64)).tolist()
    return seen, loss_sum, correct


def _checkpoint_visible(path: Path, world: int) -> bool:
    """Whether to resume from ``path``: every process must see it, or none."""
    if world == 1:
        return path.is_file()
    seen = int(distributed.all_reduce_sum(torch.tensor([int(path.is_file())])).item())
    if 0 < seen < world:
        raise UserError(f"{str(path)!r} exists for {seen} of {world} processes; put --out on storage every node "
                        f"shares, or pass --no-resume")
    return seen == world


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checked ``meta`` a training checkpoint or model file was saved with (empty for a bare
    state dict).

    Raises:
        UserError: the file is missing, unreadable, carries code, or its metadata is damaged.
    """
    return parse_meta(read_checkpoint(path)[1], f"checkpoint {str(path)!r}")
