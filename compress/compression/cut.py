"""Cut any classifier after a tap: the forward pass stops at the tap, every module it no longer
reaches is removed, and a linear head (the tap's trained probe, or a global-pooling head
initialised from it) gives the logits.

Why module surgery and not the libraries' own tools: a tap is any module path (a timm
``feature_info`` stage, a block inside a stage, a torchvision ``layer2.1.bn2``, a registered user
model's layer), while timm's ``prune_intermediate_layers`` / ``forward_intermediates`` stop only
at the stage indices a model declares (and not every timm model implements them), and
torchvision's ``create_feature_extractor`` returns an FX ``GraphModule`` whose graph hard-codes
every later call: blocks removed or channels pruned after the cut break it, some models do not
trace, and a saved model would have to be re-traced before its weights load. Here the model
object stays what it was (the same module paths, so later steps, analyses and masks keep their
names), with three changes recorded as one JSON ``cut`` transform:

- its class becomes a subclass whose ``forward`` runs the original forward until the tap's
  forward hook fires, then applies ``trim_head`` to the tap output (a hook that raises, so
  nothing after the tap is computed; tracing, ONNX export, fvcore and Torch-Pruning see only
  the ops up to the tap);
- every module the forward pass did not start before the tap fired is replaced by
  ``nn.Identity`` (parameters and FLOPs drop; the names are kept for the replay);
- ``trim_head`` (:class:`CutHead`: ``pool`` -> flatten -> ``out``) is added.

The replay (:func:`compress.compression.serialize.load_model`) swaps the class, replaces the
recorded modules and adds an empty head of the recorded size, without a forward pass.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn as nn

from compress.errors import OptionError, UserError
from compress.models.introspect import get_module, input_size_of, set_module
from compress.models.transforms import record_transform, register_transform

__all__ = ["CUT_HEAD", "CutHead", "CutModel", "cut_at", "is_cut", "cut_features", "find_classifier"]

CUT_HEAD = "trim_head"
"""Module path of the head a cut adds (its linear layer is ``trim_head.out``)."""

HeadKind = Literal["probe", "pool"]


class _TapReached(Exception):
    """Raised by the cut tap's forward hook, carrying the tap's output past the rest of the network."""

    def __init__(self, output: Any):
        super().__init__("tap reached")
        self.output = output


def _stop_at_tap(_module: nn.Module, _inputs: Any, output: Any) -> None:
    raise _TapReached(output)


class CutHead(nn.Module):
    """The head of a cut model: ``out(flatten(pool(tap output)))``.

    Args:
        pool: ``nn.Identity`` (the probe on the raw tap), ``nn.AvgPool2d(k, k, ceil_mode=True)``
            (the probe on the tap pooled as ``analysis.tap_pool`` did) or
            ``nn.AdaptiveAvgPool2d(1)`` (global pooling, one input per filter).
        out: the linear layer giving the logits.
    """

    def __init__(self, pool: nn.Module, out: nn.Linear):
        super().__init__()
        self.pool = pool
        self.flatten = nn.Flatten(1)
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.flatten(self.pool(x)))


class CutModel(nn.Module):
    """Mixin placed before a model's own class by :func:`cut_at`: the original ``forward`` runs
    until the module at ``cut_tap`` returns, then ``trim_head`` gives the logits.

    Attributes:
        cut_tap: module path of the tap the model ends at.
    """

    cut_tap: str = ""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        handles = [self.get_submodule(self.cut_tap).register_forward_hook(_stop_at_tap)]
        entered: list[nn.Module] = []
        if torch._C._is_tracing():
            handles += _track_ancestors(self, self.cut_tap, entered)
        try:
            super().forward(x, *args, **kwargs)
        except _TapReached as reached:
            _exit(entered, reached.output, {h.id for h in handles})
            return getattr(self, CUT_HEAD)(reached.output)
        finally:
            for h in handles:
                h.remove()
        raise RuntimeError(f"the forward pass of {type(self).__name__} returned before reaching its cut at "
                           f"{self.cut_tap!r}")

    def get_classifier(self) -> nn.Module:
        """The head's linear layer (``trim_head.out``)."""
        return getattr(self, CUT_HEAD).out


def _track_ancestors(model: nn.Module, tap: str, entered: list[nn.Module]) -> list[Any]:
    """Hooks that keep ``entered`` the list of the tap's ancestors whose forward has started and not
    returned (the modules the stop at the tap leaves without their forward hooks)."""
    parts = tap.split(".")
    handles = []
    for i in range(1, len(parts)):
        module = model.get_submodule(".".join(parts[:i]))
        handles.append(module.register_forward_pre_hook(lambda m, _i: entered.append(m)))
        handles.append(module.register_forward_hook(lambda m, _i, _o: entered.pop() if entered and entered[-1] is m
                                                    else None))
    return handles


def _exit(entered: list[nn.Module], output: Any, own: set[int]) -> None:
    """While tracing, run the forward hooks of the modules the stop left, innermost first.

    Scope-tracking tracers (fvcore's FLOP count) push a scope in every module's forward pre-hook
    and pop it in its forward hook; a module left by the stop would keep its scope open and
    corrupt the trace. These hooks see the tap output as the module's output; the cut's own
    hooks (ids in ``own``) are left out.
    """
    for module in reversed(entered):
        for key, hook in list(module._forward_hooks.items()):
            if key in own:
                continue
            if key in module._forward_hooks_with_kwargs:
                hook(module, (), {}, output)
            else:
                hook(module, (), output)
    entered.clear()


_CLASSES: dict[type, type] = {}


def _cut_class(cls: type) -> type:
    """The subclass of ``cls`` with :class:`CutModel` first (one per class, made once)."""
    if issubclass(cls, CutModel):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Trimmed{cls.__name__}", (CutModel, cls),
                             {"__module__": __name__, "__doc__": f"{cls.__name__} cut after a tap (see cut_at)."})
    return _CLASSES[cls]


def is_cut(model: nn.Module) -> bool:
    """True when ``model`` was cut by :func:`cut_at` (it ends at ``cut_tap`` with ``trim_head``)."""
    return isinstance(model, CutModel)


def cut_features(model: nn.Module) -> str:
    """The module whose output feeds the cut head's linear layer before flattening (``trim_head.pool``):
    its (N, C, H, W) output is what AFCC groups into filters."""
    if not is_cut(model):
        raise UserError(f"{type(model).__name__} has not been cut; trim it first")
    return f"{CUT_HEAD}.pool"


def find_classifier(model: nn.Module) -> str:
    """Module path of the model's linear classifier: ``get_classifier()`` where it is an
    ``nn.Linear`` (timm, the own models, cut models), else the last ``nn.Linear`` registered
    (torchvision's ``fc``, ``classifier.1``, ``classifier.3``, ``heads.head``, ...).

    Raises:
        UserError: the model has no ``nn.Linear``.
    """
    named = list(model.named_modules())
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Linear):
        return next(n for n, m in named if m is classifier)
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def _base_forward(model: nn.Module, x: torch.Tensor) -> None:
    """The model's own forward (a cut model's original one, past its current cut)."""
    if is_cut(model):
        super(CutModel, model).forward(x)  # type: ignore[misc]
    else:
        model(x)


def _run_to(model: nn.Module, tap: str, input_size: Sequence[int]) -> tuple[Any, set[str]]:
    """One eval-mode forward pass until ``tap``: its output and the modules started before it
    returned (with every ancestor of a started module)."""
    started: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_a, n=n: started.add(n)) for n, m in model.named_modules() if n]
    handles.append(model.get_submodule(tap).register_forward_hook(_stop_at_tap))
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _base_forward(model, torch.zeros(2, *input_size, device=p.device, dtype=p.dtype))
    except _TapReached as reached:
        output = reached.output
    except RuntimeError as e:
        raise UserError(f"the forward pass to tap {tap!r} fails at input size {list(input_size)}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    else:
        raise UserError(f"tap {tap!r} is not reached by {type(model).__name__}'s forward pass (removed by an earlier "
                        f"cut, or never called); choose a tap the model runs")
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    used = set(started)
    for name in started:
        parts = name.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return output, used


def _unreached(model: nn.Module, used: set[str]) -> list[str]:
    """The outermost modules outside ``used`` (the old cut head aside), in registration order."""
    out: list[str] = []
    for name, _ in model.named_modules():
        if not name or name in used or name == CUT_HEAD or name.startswith(CUT_HEAD + "."):
            continue
        if not any(name.startswith(o + ".") for o in out):
            out.append(name)
    return out


def _head_module(kind: str, shape: Sequence[int], num_classes: int, pool: int | None) -> CutHead:
    """An empty :class:`CutHead` for a tap output of ``shape`` (without the batch)."""
    spatial = len(shape) == 3
    if kind == "pool":
        if not spatial:
            raise OptionError("head", f"pool needs a tap with a (C, H, W) output, not {list(shape)}; use head: probe")
        return CutHead(nn.AdaptiveAvgPool2d(1), nn.Linear(int(shape[0]), num_classes, bias=True))
    if kind != "probe":
        raise OptionError("head", f"{kind!r} is not a head kind; valid: probe, pool")
    k = int(pool or 1)
    pooling = nn.AvgPool2d(k, k, ceil_mode=True) if spatial and k > 1 else nn.Identity()
    dims = [shape[0], *(-(-int(s) // k) for s in shape[1:])] if spatial else list(shape)
    n_in = 1
    for d in dims:
        n_in *= int(d)
    return CutHead(pooling, nn.Linear(n_in, num_classes, bias=False))


def _init_head(head: CutHead, kind: str, weight: torch.Tensor, tap: str) -> None:
    """Copy the probe ``weight`` into the head: as is (probe), or summed over each filter's
    positions (pool: the probe's logits for a tap whose every position equals the filter's mean)."""
    out = head.out
    w = torch.as_tensor(weight, dtype=out.weight.dtype, device=out.weight.device).reshape(out.out_features, -1)
    if kind == "pool":
        if w.shape[1] % out.in_features:
            raise UserError(f"the probe of tap {tap!r} has {w.shape[1]} inputs, not a multiple of its "
                            f"{out.in_features} filters; is the analysis of this model?")
        w = w.reshape(out.out_features, out.in_features, -1).sum(-1)
    elif w.shape[1] != out.in_features:
        raise UserError(f"the probe of tap {tap!r} has {w.shape[1]} inputs but the tap gives {out.in_features} "
                        f"(with analysis.tap_pool as analysed); is the analysis of this model?")
    with torch.no_grad():
        out.weight.copy_(w)
        if out.bias is not None:
            out.bias.zero_()


def _num_classes(model: nn.Module, head_weight: torch.Tensor | None, input_size: Sequence[int]) -> int:
    """K: the probe's rows, else the model's ``num_classes``, else the width of its output."""
    if head_weight is not None:
        return int(torch.as_tensor(head_weight).shape[0])
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and k > 0:
        return k
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)).shape[-1])
    finally:
        model.train(was)


def cut_at(model: nn.Module, tap: str, head_weight: torch.Tensor | None = None, *, head: HeadKind = "probe",
           pool: int | None = None, input_size: Sequence[int] | None = None) -> nn.Module:
    """Cut ``model`` after ``tap``, in place: it then returns ``trim_head(tap output)``.

    Args:
        model: any classifier (timm, torchvision, own or registered models; a cut model may be
            cut again at an earlier tap).
        tap: module path of the cut, e.g. ``layer2``, ``blocks.3``, ``features.6.2``.
        head_weight: the tap's trained probe, (K, D) or (K, C, H, W); ``None`` leaves the head
            at its initialisation.
        head: ``probe``: a bias-free ``Linear(D -> K)`` on the (pooled) tap, equal to the probe;
            ``pool``: global average pooling and ``Linear(C -> K)`` whose weight is the probe's
            summed over each filter's positions (to be fine-tuned).
        pool: the ``analysis.tap_pool`` the probe was trained with (average pooling k x k,
            stride k, ceil mode, on 4-D tap outputs).
        input_size: (C, H, W) of the pass that finds the modules to remove (default: the model's).

    Returns:
        The same model object, of its cut class, carrying a ``cut`` transform.
    """
    get_module(model, tap, "tap")
    if tap == CUT_HEAD or tap.startswith(CUT_HEAD + "."):
        raise UserError(f"cannot cut at {tap!r}, the head of an earlier cut; choose a tap of the network")
    for spec in getattr(model, "compress_transforms", []):
        if spec.get("kind") == "cut" and any(tap == r or tap.startswith(r + ".") for r in spec["removed"]):
            raise UserError(f"tap {tap!r} is not reached: the cut at {spec['tap']!r} removed it; choose a tap at "
                            f"or before {spec['tap']!r}")
    size = input_size_of(model, input_size)
    output, used = _run_to(model, tap, size)
    if not isinstance(output, torch.Tensor):
        raise UserError(f"tap {tap!r} outputs {type(output).__name__}, not a tensor; choose another layer")
    shape = tuple(output.shape[1:])
    new_head = _head_module(head, shape, _num_classes(model, head_weight, size), pool).to(output.device)
    if head_weight is not None:
        _init_head(new_head, head, head_weight, tap)
    removed = _unreached(model, used)
    _apply(model, tap, removed, new_head)
    record_transform(model, {"kind": "cut", "tap": tap, "head": head, "pool": pool, "tap_shape": list(shape),
                             "num_classes": new_head.out.out_features, "in_features": new_head.out.in_features,
                             "removed": removed})
    return model


def _apply(model: nn.Module, tap: str, removed: Sequence[str], head: CutHead) -> None:
    """Swap the class, replace ``removed`` by identities, add ``head``, and keep the model's
    declared facts (``feature_info``, ``num_features``) to what remains."""
    for path in removed:
        set_module(model, path, nn.Identity())
    model.__class__ = _cut_class(type(model))
    setattr(model, CUT_HEAD, head)
    model.cut_tap = tap
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        gone = tuple(removed)
        model.feature_info = [f for f in info if not any(f.get("module", "") == r or f.get("module", "").startswith(
            r + ".") for r in gone)]
    if hasattr(model, "num_features"):
        model.num_features = head.out.in_features


@register_transform("cut")
def _replay_cut(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Redo a recorded cut without a forward pass (the weights are loaded afterwards)."""
    for path in spec["removed"]:
        get_module(model, path)  # a clear error if the base model does not hold it
    head = _head_module(spec["head"], spec["tap_shape"], int(spec["num_classes"]), spec.get("pool"))
    if head.out.in_features != int(spec["in_features"]):
        raise UserError(f"cut transform expects a head of {spec['in_features']} inputs, the tap shape gives "
                        f"{head.out.in_features}")
    p = next(model.parameters(), None)
    _apply(model, spec["tap"], spec["removed"], head.to(p.device if p is not None else "cpu"))
    return model

