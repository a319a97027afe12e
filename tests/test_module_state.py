"""Module state in block guards: a module's parameters, buffers and gradients (and a framework
module's buffers) stay writable in ``guard()``, found where a write needs it
(``immutorch._module_state``) rather than by watching module calls; everything else from
before the block stays refused. Each case is checked against the same code run unguarded on a
copy."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import textwrap

import pytest
import torch

import immutorch
from immutorch import _boundaries
from immutorch._boundaries import hooks_installed

pytestmark = pytest.mark.both_backends(births=True)


def _trained(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    model(x).sum().backward()  # gradients from before the block
    return model


def test_raise_mode_blocks_install_no_module_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Once torch.compile has run in the process (another test's), every guard hooks module
    # calls for compiled submodules' sake: what is asserted here is the rest of the rule.
    monkeypatch.setattr(_boundaries, "compile_in_use", lambda: False)
    with immutorch.guard(scope="all"):
        assert not hooks_installed()


def test_batch_norm_running_stats_are_state_in_a_block():
    x = torch.randn(8, 3)
    bn = torch.nn.BatchNorm1d(3).train()
    oracle = copy.deepcopy(bn)
    want = oracle(x)
    with immutorch.guard(scope="all"):
        got = bn(x)
    assert torch.equal(got, want)
    assert torch.equal(bn.running_mean, oracle.running_mean)
    assert bn.num_batches_tracked.item() == 1


def test_gradients_from_before_the_block_accumulate_and_zero_outside_any_module_call():
    x = torch.randn(4, 3)
    model = _trained(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)), x)
    oracle = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.1)
    for m, o in ((oracle, opt_oracle), (model, None)):
        if o is None:
            with immutorch.guard(scope="all"):
                # backward accumulates into the existing .grad, then zero_grad writes them:
                # neither runs inside a call of the module that owns them
                model(x).sum().backward()
                opt.zero_grad(set_to_none=False)
                model(x).sum().backward()
                opt.step()
        else:
            m(x).sum().backward()
            o.zero_grad(set_to_none=False)
            m(x).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_state_of_a_module_the_block_never_calls_is_state():
    ema = torch.nn.BatchNorm1d(3)
    before = ema.running_mean.clone()
    with immutorch.guard(scope="all"):
        ema.running_mean.add_(1)  # an EMA update, say: the module is not called here
    assert torch.equal(ema.running_mean, before + 1)
    with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(protect_state=True):
        ema.running_mean.add_(1)
    assert torch.equal(ema.running_mean, before + 1)


def test_a_tensor_that_stopped_being_a_buffer_is_refused_again():
    module = torch.nn.Module()
    old = torch.zeros(3)
    module.register_buffer("stat", old)
    with immutorch.guard(scope="all"):
        old.add_(1)  # module state now: indexed
    module.stat = torch.zeros(3)  # replaced: `old` is the caller's own tensor again
    with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(scope="all"):
        old.add_(1)
    assert torch.equal(old, torch.ones(3))


def test_a_tensor_refused_once_is_state_after_it_is_registered():
    x = torch.zeros(3)
    with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(scope="all"):
        x.add_(1)
    module = torch.nn.Module()
    module.register_buffer("stat", x)
    with immutorch.guard(scope="all"):
        x.add_(1)
    assert torch.equal(x, torch.ones(3))


def test_a_swapped_parameter_storage_is_followed():
    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.zeros(2, 2)
    with immutorch.guard(scope="all"):
        lin.weight.grad.add_(1)  # indexed
    new_grad = torch.zeros(2, 2)
    lin.weight.grad = new_grad  # no registration: found by the block's rebuild
    with immutorch.guard(scope="all"):
        new_grad.add_(1)
    assert torch.equal(lin.weight.grad, torch.ones(2, 2))


def test_a_callers_input_reaching_modules_as_new_views_is_looked_up_once(monkeypatch):
    """A clone block asks about the caller's input at every module call that takes it, often
    through a new view each call (``x.transpose(1, 2)``): the answer "not state" is kept for
    the storage, so a block neither rebuilds the index nor walks the modules on the stack
    again, while no registration happened. Each call still computes what it would have."""
    from immutorch import _module_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 3, 4)
    rebuilds, walks = [], []
    rebuild, index_module = _module_state._rebuild, _module_state._index_module
    monkeypatch.setattr(_module_state, "_rebuild", lambda: rebuilds.append(1) or rebuild())
    monkeypatch.setattr(
        _module_state, "_index_module", lambda m: walks.append(m) or index_module(m)
    )
    for i in range(4):
        if i == 1:
            rebuilds.clear()
            walks.clear()
        with immutorch.guard(mode="clone", scope="all"):
            got = model(x.transpose(0, 1))
        assert torch.equal(got, model(x.clone().transpose(0, 1)))
    assert rebuilds == [] and walks == []
    model.register_buffer("stat", torch.zeros(1))  # a registration: look again, once
    for _ in range(2):
        with immutorch.guard(mode="clone", scope="all"):
            model(x.transpose(0, 1))
    assert len(rebuilds) == 1


def test_a_not_state_answer_ends_with_its_storage():
    """The answer is kept with a weak reference to the storage: once the storage is gone,
    its address may hold a module's new state, and the answer no longer applies."""
    from immutorch import _module_state

    def refused_once() -> int:
        x = torch.zeros(3)
        with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(scope="all"):
            x.add_(1)
        cdata: int = x.untyped_storage()._cdata
        assert _module_state._known_not_state(cdata)
        return cdata

    cdata = refused_once()
    gc.collect()  # the refusal's traceback and its frames held the tensor
    assert not _module_state._known_not_state(cdata)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
def test_scripted_submodule_buffers_are_state():
    x = torch.randn(8, 3)
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    oracle = copy.deepcopy(model)
    want = oracle(x)
    with immutorch.guard(scope="all"):
        got = model(x)
    assert torch.equal(got, want)
    stats, want_stats = dict(model.named_buffers()), dict(oracle.named_buffers())
    assert stats.keys() == want_stats.keys() and stats
    for name, b in stats.items():
        assert torch.equal(b, want_stats[name])


@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_other_memory_from_before_the_block_stays_protected(mode):
    x = torch.randn(8, 3)
    bn = torch.nn.BatchNorm1d(3)
    before = x.clone()
    if mode == "raise":
        with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(scope="all"):
            bn(x)
            x.mul_(2)
        assert torch.equal(x, before)
    elif mode == "warn":
        with pytest.warns(immutorch.MutationWarning), immutorch.guard(mode="warn", scope="all"):
            bn(x)
            x.mul_(2)
        assert torch.equal(x, before * 2)
    else:
        with immutorch.guard(mode="clone", scope="all"):
            bn(x)
            out = torch.nn.ReLU(inplace=True)(x)  # a module call: the write lands in a copy
        assert torch.equal(x, before) and torch.equal(out, before.relu())


def test_modules_made_before_immutorch_was_imported_are_found():
    # The registration hooks see modules made after the import; one scan of the collector's
    # objects finds the older ones.
    code = textwrap.dedent(
        """
        import torch
        bn = torch.nn.BatchNorm1d(3)
        bn.running_mean.add_(0)
        import immutorch
        with immutorch.guard(scope="all"):
            bn.running_mean.add_(1)
        assert torch.equal(bn.running_mean, torch.ones(3))
        x = torch.zeros(3)
        try:
            with immutorch.guard(scope="all"):
                x.add_(1)
        except immutorch.ImmutableTensorError:
            print("refused")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"
