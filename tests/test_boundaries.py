"""guard() with no tensors named, nn.Module boundaries, watched modules and torch.compile."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import immutorch
from immutorch import _compiled
from immutorch._boundaries import watch_modules

pytestmark = pytest.mark.both_backends


@pytest.fixture(autouse=True, params=["all", "arguments"])
def scope(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs through both backends: IMMUTORCH_SCOPE overrides the scope each
    decorator, guard and watch asks for."""
    monkeypatch.setenv("IMMUTORCH_SCOPE", request.param)
    return str(request.param)


class RowNormalizer(torch.nn.Module):
    """SpeechBrain's bug in miniature: per-row writes into the input, returning it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(x.shape[0]):
            x[i] = (x[i] - x[i].mean()) / (x[i].std() + 1e-5)
        return x


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mods = torch.nn.ModuleDict(
            {
                "normalizer": RowNormalizer(),
                "conv": torch.nn.Conv1d(6, 4, 3),
                "norm": torch.nn.BatchNorm1d(4),
                "act": torch.nn.ReLU(inplace=True),
            }
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel.to("cpu").transpose(1, 2)  # [B, T, F] view of the caller's mel
        x = self.mods.normalizer(x)
        y = self.mods.act(self.mods.norm(self.mods.conv(x.transpose(1, 2))))
        return y.mean(dim=2)


def oracle(model: torch.nn.Module, mel: torch.Tensor) -> torch.Tensor:
    return model(mel.clone())


@pytest.mark.parametrize("training", [False, True])
def test_block_clone_keeps_the_callers_data_and_the_result(training):
    model = Encoder().train(training)
    mel = torch.randn(2, 6, 9)
    before = mel.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = oracle(model, mel)
    model.load_state_dict(state)  # the oracle run moved BatchNorm's running statistics
    with immutorch.guard(mode="clone") as g:
        out = model(mel)
    assert torch.equal(out, expected)
    assert torch.equal(mel, before)
    assert g.stats.copies == 1 and g.stats.bytes_copied == mel.numel() * 4


def test_block_raise_names_the_module_path_op_and_line(scope: str) -> None:
    model = Encoder().eval()
    mel = torch.randn(2, 6, 9)
    before = mel.clone()
    with pytest.raises(immutorch.ImmutableTensorError) as info, immutorch.guard():
        model(mel)
    err = info.value
    assert torch.equal(mel, before)
    assert err.op == "aten::copy_"
    assert err.where == "mods.normalizer (RowNormalizer)"
    assert err.location is not None and err.location.endswith(
        f"test_boundaries.py:{RowNormalizer.forward.__code__.co_firstlineno + 2}"
    )
    assert "mods.normalizer (RowNormalizer)" in str(err)
    # The module's parameter that received the caller's memory: in scope "arguments" the
    # outermost module's (nested calls inside a scoped call do no boundary work).
    assert err.argument == ("x" if scope == "all" else "mel")


def test_block_leaves_module_state_writable_unless_asked():
    bn = torch.nn.BatchNorm1d(3).train()
    x = torch.randn(4, 3)
    with immutorch.guard():
        bn(x)  # running statistics and num_batches_tracked are state
    assert bn.num_batches_tracked.item() == 1
    with pytest.raises(immutorch.ImmutableTensorError, match="aten::"):
        with immutorch.guard(protect_state=True):
            bn(x)


def test_block_allows_given_tensors_and_optimizers():
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(2, 3)).sum().backward()
    opt.step()  # creates optimizer state outside the block
    lin(torch.ones(2, 3)).sum().backward()
    with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard():
        opt.step()
    with immutorch.guard(allow=[opt, lin]):
        opt.step()
    scratch = torch.zeros(3)
    with immutorch.guard(allow=scratch):
        scratch.add_(1)
    assert torch.equal(scratch, torch.ones(3))


def test_block_memory_stays_writable():
    outside = torch.ones(3)
    with immutorch.guard():
        inside = outside * 2
        inside.add_(1)
        inside[0] = 0
        torch.nn.functional.relu(inside, inplace=True)
        lst = torch.tensor([1, 2, 3])
        lst.mul_(2)
        buf = torch.empty(3)
        torch.add(outside, 1, out=buf)
    assert torch.equal(buf, torch.full((3,), 2.0)) and torch.equal(lst, torch.tensor([2, 4, 6]))


def test_nested_module_boundary_writes_stay_visible_to_the_outer_callee():
    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = RowNormalizer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inner(x)  # result ignored: the outer relies on the in-place write
            return x * 1

    model = Outer()
    x = torch.randn(3, 5)
    before = x.clone()
    expected = oracle(model, x)
    with immutorch.guard(mode="clone"):
        out = model(x)
    assert torch.equal(out, expected) and torch.equal(x, before)


def test_watch_protects_inputs_of_watched_modules_only():
    relu_inplace = torch.nn.ReLU(inplace=True)
    norm = RowNormalizer()
    x = torch.randn(3, 4)
    with watch_modules(lambda m: isinstance(m, (RowNormalizer, torch.nn.ReLU)), "raise"):
        relu_inplace(x.clone())  # inplace=True modules are exempt by default
        with pytest.raises(immutorch.ImmutableTensorError, match=r"RowNormalizer"):
            norm(x.clone())
    with watch_modules(lambda m: True, "raise", include_inplace=True):
        with pytest.raises(immutorch.ImmutableTensorError, match=r"aten::(relu|clamp)"):
            relu_inplace(x.clone())
    norm(x.clone())  # watch over: nothing checked


def test_watch_in_warn_mode_collects_every_write():
    norm = RowNormalizer()
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch_modules(lambda m: True, "warn"):
            norm(x)
    found = [w.message for w in caught if isinstance(w.message, immutorch.MutationWarning)]
    assert len(found) == 3 and all(w.where == "RowNormalizer" for w in found)


def test_hooks_come_off_as_the_last_guard_ends(monkeypatch, scope):
    from immutorch import _boundaries
    from immutorch._boundaries import hooks_installed
    from immutorch._registry import STATE

    if STATE.watchers:
        pytest.skip("a watch (pytest --immutorch-modules) holds the hooks for the whole test")
    # Once torch.compile has been used in the process (an earlier test), every guard hooks
    # module calls, for the compiled modules among them.
    monkeypatch.setattr(_boundaries, "compile_in_use", lambda: False)
    lin = torch.nn.Linear(1, 1)
    # Raise and warn mode need no module hooks, and install none, in a block too: it finds
    # module state where a write needs it (_module_state). Scope "arguments" hands scoped
    # aliases over at module calls.
    for mode in ("raise", "warn"):
        with immutorch.guard(mode=mode):
            assert hooks_installed() == (scope == "arguments")
            lin(torch.zeros(1))
    # A clone-mode block hands its arguments over at module calls (the test passed only after
    # a test that had left them in place).
    with immutorch.guard(mode="clone"):
        assert hooks_installed()
        lin(torch.zeros(1))
    # Nothing outlives the last guard (torch.export's strict mode fails with any global hook).
    assert not hooks_installed()
    lin(torch.zeros(1))
    assert not hooks_installed()


class InplaceScale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x.sin()


@pytest.mark.parametrize("mode", ["raise", "clone", "warn"])
def test_compiled_module_stays_compiled_and_keeps_the_promise(mode, caplog):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _compiled._told.clear()  # the note is logged once per place; each run here must see it
    compiled = torch.compile(InplaceScale(), backend="eager")
    x = torch.randn(4)
    before = x.clone()
    expected = InplaceScale()(x.clone())
    with caplog.at_level(logging.WARNING, logger="immutorch"):
        if mode == "raise":
            with pytest.raises(immutorch.ImmutableTensorError, match="compiled code"):
                with immutorch.guard(x, mode=mode):
                    compiled(x)
            assert torch.equal(x, before)
        elif mode == "clone":
            with immutorch.guard(x, mode=mode):
                out = compiled(x)
            assert torch.equal(out, expected) and torch.equal(x, before)
        else:
            with pytest.warns(immutorch.MutationWarning, match="compiled code"):
                with immutorch.guard(x, mode=mode):
                    out = compiled(x)
            assert torch.equal(out, expected)
    assert counters["frames"]["ok"] >= 1, "the guard must not make Dynamo skip the frame"
    compiled(torch.randn(4))
    assert counters["frames"]["ok"] >= 1
    assert any("torch.compile" in r.getMessage() for r in caplog.records) or mode != "raise"


def test_decorated_compiled_function_is_not_run_under_the_mode():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def bump(t: torch.Tensor) -> torch.Tensor:
        return t.add_(1)

    f = immutorch.immutable_inputs(mode="clone")(torch.compile(bump, backend="eager"))
    x = torch.zeros(2)
    assert torch.equal(f(x), torch.ones(2)) and torch.equal(x, torch.zeros(2))
    assert counters["frames"]["ok"] >= 1


def test_a_keyword_argument_is_handed_over_in_clone_mode():
    # The module-call shell is given keyword arguments on every torch (global pre-hooks on
    # 2.13 and older were not).
    norm = RowNormalizer()
    x = torch.randn(3, 4)
    before = x.clone()
    want = RowNormalizer()(x=before.clone())
    with immutorch.guard(x, mode="clone"):
        out = norm(x=x)
    assert torch.equal(x, before)
    assert torch.equal(out, want)


class KeywordScaler(torch.nn.Module):
    """Writes into a tensor it is handed by keyword only."""

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        scale.mul_(2)
        return x * scale


class PassesByKeyword(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = KeywordScaler()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.inner(x, scale=scale)


def _keyword_door(door: str, mode: str):  # type: ignore[no-untyped-def]
    if door == "watch":
        return watch_modules(lambda m: isinstance(m, KeywordScaler), mode)  # type: ignore[arg-type]
    return immutorch.guard(mode=mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("door", ["watch", "guard()"])
def test_keyword_tensor_write_is_refused_on_this_torch(door):
    x, scale = torch.ones(3), torch.arange(3.0)
    before = scale.clone()
    with pytest.raises(immutorch.ImmutableTensorError, match="`scale`") as info:
        with _keyword_door(door, "raise"):
            PassesByKeyword()(x, scale)
    assert torch.equal(scale, before)
    assert info.value.argument == "scale"


@pytest.mark.parametrize("door", ["watch", "guard()"])
def test_keyword_tensor_write_lands_in_a_private_copy_in_clone_mode(door):
    x, scale = torch.ones(3), torch.arange(3.0)
    before = scale.clone()
    want = PassesByKeyword()(x.clone(), scale.clone())
    with _keyword_door(door, "clone"):
        got = PassesByKeyword()(x, scale)
    assert torch.equal(got, want)
    assert torch.equal(scale, before)


@pytest.mark.parametrize("door", ["watch", "guard()"])
def test_keyword_tensor_write_is_reported_in_warn_mode(door):
    x, scale = torch.ones(3), torch.arange(3.0)
    oracle_scale = scale.clone()
    want = PassesByKeyword()(x.clone(), oracle_scale)
    with pytest.warns(immutorch.MutationWarning, match="`scale`"):
        with _keyword_door(door, "warn"):
            got = PassesByKeyword()(x, scale)
    assert torch.equal(got, want) and torch.equal(scale, oracle_scale)


def test_keyword_arguments_of_the_callers_dict_are_never_replaced():
    # Clone mode swaps in aliases inside the dict forward is called with, which torch builds
    # for each call: a dict the caller passes with ** keeps its own tensors.
    x, scale = torch.ones(3), torch.arange(3.0)
    kwargs = {"scale": scale}
    with immutorch.guard(mode="clone"):
        KeywordScaler()(x, **kwargs)
    assert kwargs["scale"] is scale
    assert torch.equal(scale, torch.arange(3.0))
