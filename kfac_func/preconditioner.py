r"""K-FAC as a gradient preconditioner for any ``torch.optim`` optimizer (the pattern of the distributed
K-FAC library for PyTorch): each :meth:`Preconditioner.step` replaces every ``p.grad`` in place by its
preconditioned version ``Δ`` and leaves the update to SGD, AdamW, a scheduler, a Lightning or
Hugging Face loop::

    precond = kf.Preconditioner(model, loss="cross_entropy")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        precond.curvature_backward(out)      # fisher="mc" / "exact" (the default is "mc")
        F.cross_entropy(out, y).backward()
        precond.step()                       # p.grad ← (G ⊗ A + λ)⁻¹ p.grad, per layer
        opt.step()

The statistics are recorded from the user's forwards and backwards as for :class:`kfac_func.KFAC`'s
``step()`` (:mod:`kfac_func.record`: gradient accumulation, ``GradScaler`` through ``grad_scaler=``,
``DistributedDataParallel``). It *is* that optimizer with no step of its own — learning rate 1, no
momentum, no weight decay — whose preconditioned direction (:attr:`StepInfo.direction`) is handed over
instead of applied. The KL clip ``ν = min(1, √(κ / (η² Σ Δ·∇)))`` (``kl_clip=κ``, 1e-3 by default as kfac-pytorch's;
``None`` turns it off) bounds the step the downstream optimizer takes whatever its learning rate, with ``lr`` (a
number, or a function returning the downstream optimizer's current one; 1 by default) as ``η``: pass it so that the
clip measures that optimizer's actual step (``lr=lambda: sgd.param_groups[0]["lr"]``). Unclipped, a preconditioned
gradient at a small damping can be orders of magnitude larger than the gradient, and SGD with momentum diverges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .optim import KFAC, Report


class Preconditioner:
    """K-FAC (``method``: also ``"ekfac"`` and ``"two_level"``) preconditioning of ``model``'s gradients in
    place; ``options`` are :class:`kfac_func.KFAC`'s except the step's own (``lr``, ``momentum``,
    ``weight_decay``, ``adaptive``, ``step_scale``) and the options that evaluate the model again."""

    def __init__(self, model: nn.Module, *, kl_clip: float | None = 1e-3, lr: float | Callable[[], float] = 1.0,
                 **options: Any):
        own = sorted({"momentum", "weight_decay", "adaptive", "step_scale", "damping_adaptation", "reject_steps"}
                     & set(options))
        if own:
            raise TypeError(f"Preconditioner does not take {own}: the optimizer it feeds owns the step")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Preconditioner records an nn.Module's forward, got {type(model).__name__}")
        self._lr = lr
        start = 1.0 if callable(lr) else lr  # a function is read at each step, not before its optimizer exists
        self.optimizer = KFAC(model, lr=start, momentum=0.0, weight_decay=0.0, kl_clip=kl_clip, **options)

    def _current_lr(self) -> float:
        return float(self._lr() if callable(self._lr) else self._lr)

    @property
    def info(self) -> Report | None:
        """The last step's :class:`~kfac_func.optim.Report` (``alpha``: ``η·ν``)."""
        return self.optimizer.info

    def curvature_backward(self, output: Tensor) -> None:
        """See :meth:`kfac_func.KFAC.curvature_backward`."""
        self.optimizer.curvature_backward(output)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Replace each ``p.grad`` by its preconditioned gradient (the closure, if given, runs the forward and
        backward first, as in :meth:`kfac_func.KFAC.step`); returns the closure's loss. A step with a
        non-finite gradient or statistic changes nothing (``p.grad`` included) and warns."""
        opt = self.optimizer
        for group in opt.param_groups:
            group["lr"] = self._current_lr()
        loss, _, info = opt._recorded(closure)
        if bool(info.finite):
            for p, name in opt._names.items():
                if name in info.direction and p.grad is not None:  # no gradient: left to the optimizer to skip
                    p.grad = info.direction[name].to(p.dtype)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The underlying optimizer's (factors, decompositions, counters: plain data)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
