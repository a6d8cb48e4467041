"""AdamW with fp32 master weights, gradient clipping and Megatron's learning-rate schedules.

The update is ``torch.optim.AdamW``'s, step for step (decoupled decay first, then the bias-corrected Adam step with
``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``); host-side scalars (step size, bias corrections) are computed in
float64 like torch does in Python. MindSpore's ``nn.AdamWeightDecay`` differs (no bias correction), so it is not
used. As in Megatron, 1-D tensors (biases, norm scales) take no weight decay. Frozen parameters are not given to
the optimizer, so they keep no state.

Backends (``omni_fast.ops.adamw``): on CPU, with float32/bfloat16 parameters, one fused C++ kernel updates every
tensor in place and another sums the squared gradients. The update is bit-equal to the reference composition kept
below as PyNative runs it; under ``ms.jit`` MindSpore folds the composition's ``1.0 - beta`` constants in float32
(the kernel, like torch, rounds them from double), so there the two differ in the last bits. The kernel is also the
only backend that can write bfloat16 parameters on CPU, where MindSpore cannot assign them. Elsewhere, or with
``OMNI_FAST_BACKEND=reference``, the composition runs.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from omni_fast.ops import adamw as adamw_ops
from omni_fast.ops import dispatch


class AdamW(nn.Cell):
    def __init__(
        self,
        params: list[Parameter],
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if not params:
            raise ValueError("AdamW: no trainable parameters (with --enable-dummy-optimizer a stage may have none)")
        self.params = ParameterTuple(params)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        # fp32 master copies only where the model stores a lower precision (bf16 on Ascend).
        self.has_master = tuple(p.dtype != ms.float32 for p in params)
        self.master = ParameterTuple(
            [
                Parameter(p.astype(ms.float32), name=f"master.{p.name}", requires_grad=False)
                for p, m in zip(params, self.has_master)
                if m
            ]
        )
        self.exp_avg = ParameterTuple(
            [Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg.{p.name}", requires_grad=False) for p in params]
        )
        self.exp_avg_sq = ParameterTuple(
            [
                Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg_sq.{p.name}", requires_grad=False)
                for p in params
            ]
        )
        self.decays = tuple(p.ndim > 1 for p in params)
        self.step_count = 0
        self.backend = dispatch.choose("adamw", adamw_ops.backend_reasons([p.dtype for p in params]))
        if self.backend == "cpu_kernel":
            masters = iter(self.master)
            # The kernel's float32 weights: the master where there is one, else the parameter itself; the
            # parameters then go in once more as the "low" tensors (bfloat16 ones are refreshed, float32 ignored).
            self.kernel_weights = tuple(next(masters) if m else p for p, m in zip(params, self.has_master))
            self.decay_flags = Tensor(np.array(self.decays, np.int64))
            self.param_names = tuple(p.name for p in params)
            self.param_shapes = tuple(tuple(p.shape) for p in params)
            self.hyper_constants = adamw_ops.hyper_constants(beta1, beta2, eps)
            self.kernel = adamw_ops.update_op()

    def host_scalars(self, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """Advance the step and return (lr * weight decay, step size, sqrt of bias correction 2) as fp32 tensors."""
        self.step_count += 1
        bias_correction1 = 1.0 - self.beta1**self.step_count
        bias_correction2 = 1.0 - self.beta2**self.step_count
        scalars = (lr * self.weight_decay, lr / bias_correction1, math.sqrt(bias_correction2))
        return tuple(Tensor(np.float32(s)) for s in scalars)

    def construct(self, grads: tuple, grad_scale: Tensor, lr_wd: Tensor, step_size: Tensor, bc2_sqrt: Tensor):
        """One update with ``grads * grad_scale`` (the clipping coefficient, 1 when not clipping)."""
        if self.backend == "cpu_kernel":
            check_grads(grads, self.param_names, self.param_shapes)
            hyper = adamw_ops.hyper(lr_wd, step_size, bc2_sqrt, grad_scale, self.hyper_constants)
            self.kernel(
                *grads, *self.kernel_weights, *self.exp_avg, *self.exp_avg_sq, *self.params, self.decay_flags, hyper
            )
            return True
        master_index = 0
        for i in range(len(self.params)):
            param = self.params[i]
            if self.has_master[i]:
                weights = self.master[master_index]
            else:
                weights = param
            g = grads[i].astype(ms.float32) * grad_scale
            w = weights * (1.0 - lr_wd) if self.decays[i] else weights * 1.0
            m = self.exp_avg[i] + (1.0 - self.beta1) * (g - self.exp_avg[i])
            v = self.exp_avg_sq[i] * self.beta2 + (1.0 - self.beta2) * g * g
            denom = ops.sqrt(v) / bc2_sqrt + self.eps
            w = w - step_size * (m / denom)
            ops.assign(self.exp_avg[i], m)
            ops.assign(self.exp_avg_sq[i], v)
            if self.has_master[i]:
                ops.assign(weights, w)
                ops.assign(param, w.astype(param.dtype))
                master_index += 1
            else:
                ops.assign(param, w)
        return True

    def state(self) -> dict[str, np.ndarray]:
        """Optimizer state by parameter name (fp32 numpy), for checkpoints."""
        out: dict[str, np.ndarray] = {"step": np.array(self.step_count, np.int64)}
        for tensors in (self.exp_avg, self.exp_avg_sq, self.master):
            out.update({p.name: p.asnumpy() for p in tensors})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        wanted = {p.name: p for tensors in (self.exp_avg, self.exp_avg_sq, self.master) for p in tensors}
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for name, p in wanted.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"optimizer state {name}: shape {state[name].shape}, expected {p.shape}")
            p.set_data(Tensor(state[name]))
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])


def check_grads(grads: tuple, names: tuple, shapes: tuple) -> None:
    """For the kernel: one float32 or bfloat16 gradient of its parameter's shape per parameter (static: also checked
    while ms.jit compiles, where a Parameter's name cannot be read, hence the names as strings). One comparison of
    whole tuples, not a branch per parameter: ms.jit nests a graph per ``if``, and a model has hundreds."""
    if len(grads) != len(shapes):
        raise ValueError(f"AdamW: {len(grads)} gradients for {len(shapes)} parameters")
    got_shapes = tuple([g.shape for g in grads])
    got_dtypes = tuple([g.dtype for g in grads])
    if got_shapes != shapes or not all([d in dispatch.KERNEL_DTYPES for d in got_dtypes]):
        raise ValueError(gradient_mismatch(got_shapes, got_dtypes, names, shapes))


@ops.constexpr  # plain Python at compile time: a loop here would otherwise become nested graphs too
def gradient_mismatch(got_shapes: tuple, got_dtypes: tuple, names: tuple, shapes: tuple) -> str:
    """The message for the first gradient that does not fit its parameter."""
    for got, dtype, name, want in zip(got_shapes, got_dtypes, names, shapes):
        if got != want:
            return f"AdamW: gradient of shape {got} for parameter {name} of shape {want}"
        if dtype not in dispatch.KERNEL_DTYPES:
            return f"AdamW: gradient of {name} has dtype {dtype}, not float32 or bfloat16"
    return "AdamW: gradients do not fit the parameters"


def global_grad_norm(grads: tuple) -> Tensor:
    """sqrt(sum of squared gradient entries), in float32 (the fused kernel accumulates the sum in double)."""
    return ops.sqrt(adamw_ops.grad_squared_sum(grads))


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, style: str) -> float:
    """Megatron's schedule: linear warmup from 0 to ``lr``, then constant, linear or cosine decay to ``min_lr``.

    ``step`` counts optimizer steps from 1.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if style == "constant":
        return lr
    if decay_steps <= warmup_steps:
        return min_lr
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    if style == "linear":
        coeff = 1.0 - progress
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    else:
        raise ValueError(f"unknown lr decay style {style!r}")
    return min_lr + coeff * (lr - min_lr)
