"""The real bugs of writing into a tensor autograd saved for backward, each as one program.

Each case is ``program(inplace, probe)``: with ``inplace=True`` it is the bug as users write
it; with ``inplace=False`` the same program written out of place, the oracle. It returns the
gradients (and, where a step ran, the parameters) to compare, and before its write it puts
the tensor about to be written in ``probe["target"]`` (with a copy in ``probe["before"]``), so
a test can check that a refusal came before the data changed. The line that saves carries
``# saves`` and the line that writes ``# writes``: the messages must name both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

Program = Callable[[bool, dict], list]


@dataclass(frozen=True)
class Case:
    name: str
    program: Program
    node: str  # the autograd node the refusal names as the saver
    op: str  # a regex for the writing op
    # What autograd alone does with the bug: "error" (its version check at backward) or
    # "silent" (a wrong gradient, no error).
    autograd: str
    # torch's own save_on_cpu keeps a CPU output in its packed value, which holds the output's
    # node: a cycle only backward breaks (seen on 2.13 without immutorch). Tests that stop
    # before backward run it on the target afterwards.
    needs_backward_to_free: bool = False


def _mark(probe: dict, t: torch.Tensor) -> None:
    probe["target"] = t
    probe["before"] = t.detach().clone()


def _leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def sigmoid_mul(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    b = a.sigmoid()  # saves
    _mark(probe, b)
    if inplace:
        b.mul_(2)  # writes
    else:
        b = b.mul(2)
    b.sum().backward()
    return [a.grad]


def tanh_iadd(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    b = a.tanh()  # saves
    _mark(probe, b)
    if inplace:
        b += 1  # writes
    else:
        b = b + 1
    (b * b).sum().backward()
    return [a.grad]


def relu_inplace(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    c = a.tanh()  # saves
    _mark(probe, c)
    relu = torch.nn.ReLU(inplace=inplace)
    c = relu(c)  # writes
    c.sum().backward()
    return [a.grad]


def activation_iadd(inplace: bool, probe: dict) -> list:
    a, w = _leaf(3, 4), _leaf(4, seed=1)
    act = a.sin()
    y = act * w  # saves
    _mark(probe, act)
    if inplace:
        act += 1  # writes
    else:
        act = act + 1
    (y.sum() + act.sum()).backward()
    return [a.grad, w.grad]


def data_write(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    b = a.sigmoid()  # saves
    _mark(probe, b)
    if inplace:
        b.data[1] = 2  # writes
    else:
        # What `.data` does: the value changes, autograd's graph does not see it.
        b = b + (torch.tensor([0.0, 1.0, 0.0, 0.0]) * (2 - b)).detach()
    b.sum().backward()
    return [a.grad]


def detach_write(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    b = a.exp()  # saves
    _mark(probe, b)
    if inplace:
        b.detach().mul_(3)  # writes
    else:
        b = b + (2 * b).detach()  # the value changes, autograd's graph does not see it
    b.sum().backward()
    return [a.grad]


def gan_order(inplace: bool, probe: dict) -> list:
    torch.manual_seed(0)
    g_net, d_net = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    opt_d = torch.optim.SGD(d_net.parameters(), lr=0.5)
    z = torch.randn(5, 3)
    fake = g_net(z)
    loss_d = d_net(fake.detach()).mean()
    loss_g = -d_net(fake).mean()  # saves
    loss_d.backward()
    _mark(probe, d_net.weight)
    if inplace:
        opt_d.step()  # writes
        loss_g.backward()
        g_grads = [p.grad for p in g_net.parameters()]
    else:  # the intended order: loss_g's gradient with the weights it was computed with
        g_grads = list(torch.autograd.grad(loss_g, list(g_net.parameters())))
        opt_d.step()
    return [*g_grads, *(p.detach() for p in d_net.parameters())]


def rnn_hidden_state(inplace: bool, probe: dict) -> list:
    x, w, u = _leaf(3, 2, 4), _leaf(4, 5, seed=1), _leaf(5, 5, seed=2)
    h = torch.zeros(2, 5)
    _mark(probe, h)
    for step in range(3):
        pre = x[step] @ w + h @ u  # saves
        if inplace:
            h.copy_(torch.tanh(pre))  # writes
        else:
            h = torch.tanh(pre)
    h.sum().backward()
    return [x.grad, w.grad, u.grad]


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def function_input(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    x = a * 1.5
    y = Square.apply(x)  # saves
    _mark(probe, x)
    if inplace:
        x.add_(1)  # writes
    else:
        x = x + 1
    (y.sum() + x.sum()).backward()
    return [a.grad]


def _body(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


def _checkpointed(use_reentrant: bool) -> Program:
    def program(inplace: bool, probe: dict) -> list:
        a = _leaf(4)
        x = a * 1.5
        y = checkpoint(_body, x, use_reentrant=use_reentrant)  # saves
        _mark(probe, x)
        if inplace:
            x.mul_(2)  # writes
        else:
            x = x * 2
        (y.sum() + x.sum()).backward()
        return [a.grad]

    return program


checkpoint_reentrant = _checkpointed(True)
checkpoint_non_reentrant = _checkpointed(False)


def save_on_cpu(inplace: bool, probe: dict) -> list:
    a = _leaf(4)
    with torch.autograd.graph.save_on_cpu():
        b = a.sigmoid()  # saves
    _mark(probe, b)
    if inplace:
        b.mul_(2)  # writes
    else:
        b = b.mul(2)
    b.sum().backward()
    return [a.grad]


CASES = [
    Case("sigmoid_mul", sigmoid_mul, "SigmoidBackward0", r"aten::mul_", "error"),
    Case("tanh_iadd", tanh_iadd, "TanhBackward0", r"aten::add_", "error"),
    Case("relu_inplace", relu_inplace, "TanhBackward0", r"aten::(relu_|threshold_)", "error"),
    Case("activation_iadd", activation_iadd, "MulBackward0", r"aten::add_", "error"),
    Case("data_write", data_write, "SigmoidBackward0", r"aten::(copy_|fill_)", "silent"),
    Case("detach_write", detach_write, "ExpBackward0", r"aten::mul_", "error"),
    Case("gan_order", gan_order, "Backward0", r"aten::(_foreach_add_|add_)", "error"),
    Case("rnn_hidden_state", rnn_hidden_state, "MmBackward0", r"aten::copy_", "error"),
    Case("function_input", function_input, "SquareBackward", r"aten::add_", "error"),
    Case(
        "checkpoint_reentrant",
        checkpoint_reentrant,
        "CheckpointFunctionBackward",
        r"aten::mul_",
        "error",
    ),
    Case(
        "checkpoint_non_reentrant",
        checkpoint_non_reentrant,
        "torch.utils.checkpoint (an input it recomputes from)",
        r"aten::mul_",
        "error",
    ),
    Case(
        "save_on_cpu",
        save_on_cpu,
        "SigmoidBackward0",
        r"aten::mul_",
        "silent",
        needs_backward_to_free=True,
    ),
]


def oracle(case: Case) -> list:
    return case.program(False, {})


def marked_lines(case: Case) -> tuple[int, int]:
    """The line numbers of the case's ``# saves`` and ``# writes`` lines."""
    import inspect

    def find(fn: Callable[..., object], mark: str) -> Optional[int]:
        lines, start = inspect.getsourcelines(fn)
        for i, line in enumerate(lines):
            if line.rstrip().endswith(mark):
                return start + i
        return None

    saves = find(case.program, "# saves")
    writes = find(case.program, "# writes")
    assert saves is not None and writes is not None, case.name
    return saves, writes
