"""The public front doors: decorator forms, guard, read-only marks, stats, configuration."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

import immutorch

pytestmark = pytest.mark.both_backends


def writes(x: torch.Tensor) -> torch.Tensor:
    x[0] = 7
    return x


class Holder:
    @immutorch.immutable_inputs
    def method(self, x: torch.Tensor) -> torch.Tensor:
        return writes(x)

    @immutorch.immutable_inputs
    @staticmethod
    def static(x: torch.Tensor) -> torch.Tensor:
        return writes(x)

    @immutorch.immutable_inputs
    @classmethod
    def klass(cls, x: torch.Tensor) -> torch.Tensor:
        return writes(x)


class Writer(torch.nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x.mul_(scale)
        return x


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x: immutorch.immutable_inputs(writes)(x), id="function"),
        pytest.param(lambda x: Holder().method(x), id="method"),
        pytest.param(lambda x: Holder.static(x), id="staticmethod-via-class"),
        pytest.param(lambda x: Holder().static(x), id="staticmethod-via-instance"),
        pytest.param(lambda x: Holder.klass(x), id="classmethod"),
        pytest.param(lambda x: immutorch.immutable_inputs(Writer())(x, 2.0), id="module"),
        pytest.param(
            lambda x: immutorch.immutable_inputs(type("W2", (Writer,), {}))()(x, 2.0),
            id="module-class",
        ),
    ],
)
def test_every_decorated_form_protects_its_tensor_argument(call):
    x = torch.arange(4.0)
    before = x.clone()
    with pytest.raises(immutorch.ImmutableTensorError, match=r"would write into `x`"):
        call(x)
    assert torch.equal(x, before)


def test_signature_and_metadata_are_preserved():
    def f(x: torch.Tensor, *, k: int = 3) -> torch.Tensor:
        """Doc."""
        return x

    g = immutorch.immutable_inputs(mode="warn")(f)
    assert inspect.signature(g) == inspect.signature(f)
    assert g.__name__ == "f" and g.__doc__ == "Doc."


def test_only_protects_the_named_parameters():
    @immutorch.immutable_inputs(only=("x",))
    def f(x: torch.Tensor, buf: torch.Tensor) -> None:
        buf.add_(1)  # not protected
        x.add_(1)

    x, buf = torch.zeros(2), torch.zeros(2)
    with pytest.raises(immutorch.ImmutableTensorError, match="`x`"):
        f(x, buf)
    assert torch.equal(buf, torch.ones(2)) and torch.equal(x, torch.zeros(2))


def test_only_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"names \['y'\], which are not parameters"):
        immutorch.immutable_inputs(only=("y",))(writes)


def test_labels_follow_varargs_kwargs_defaults_and_containers():
    default = torch.zeros(2)

    @immutorch.immutable_inputs
    def f(a, *rest, d=default, **extra):
        extra["w"]["inner"][1].add_(1)

    with pytest.raises(immutorch.ImmutableTensorError, match=r"`extra\['w'\]\['inner'\]\[1\]`"):
        f(1, torch.zeros(1), w={"inner": [torch.zeros(1), torch.zeros(1)]})

    @immutorch.immutable_inputs
    def g(a, d=default):
        d.add_(1)

    with pytest.raises(immutorch.ImmutableTensorError, match="`d`"):
        g(1)
    assert torch.equal(default, torch.zeros(2))


def test_non_tensor_arguments_are_ignored():
    @immutorch.immutable_inputs
    def f(n: int, s: str, obj: object) -> int:
        return n

    assert f(3, "a", object()) == 3


def test_decorator_rejects_non_callables_and_bad_modes():
    with pytest.raises(TypeError, match="decorates functions"):
        immutorch.immutable_inputs(42)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="mode must be one of 'raise', 'warn', 'clone', 'off'"):
        immutorch.immutable_inputs(mode="strict")  # type: ignore[arg-type]


def test_guard_as_decorator_and_stats():
    x = torch.zeros(3)
    g = immutorch.guard(mode="clone")

    @g
    def run() -> torch.Tensor:
        return torch.nn.ReLU(inplace=True)(x - 1) + x

    assert torch.equal(run(), torch.zeros(3))
    assert g.stats.copies == 0  # x - 1 is the block's own memory


def test_guard_protects_a_modules_parameters():
    lin = torch.nn.Linear(2, 2)
    before = lin.weight.detach().clone()
    with pytest.raises(immutorch.ImmutableTensorError, match=r"guard argument 0 \(weight\)"):
        with immutorch.guard(lin), torch.no_grad():
            lin.weight.zero_()
    assert torch.equal(lin.weight, before)


def test_guard_rejects_non_tensors():
    with pytest.raises(TypeError, match="argument 0 is a int"):
        immutorch.guard(3)
    with pytest.raises(TypeError, match=r"allow=\.\.\."):
        with immutorch.guard(allow=3):  # type: ignore[arg-type]
            pass


def test_readonly_marks_last_cover_views_and_are_enforced_by_guards():
    w = torch.ones(4)
    immutorch.readonly(w)
    assert immutorch.is_readonly(w[1:]) and immutorch.is_readonly(w.view(2, 2))
    w.add_(0)  # no guard active: the mark alone installs nothing
    with pytest.raises(immutorch.ImmutableTensorError, match="marked read-only"):
        with immutorch.guard(torch.empty(0)):
            w[2:].fill_(3)
    assert torch.equal(w, torch.ones(4))
    immutorch.writable(w)
    assert not immutorch.is_readonly(w)
    with immutorch.guard(torch.empty(0)):
        w.add_(1)
    assert torch.equal(w, torch.full((4,), 2.0))


def test_readonly_holds_no_reference():
    import weakref

    t = torch.ones(3)
    immutorch.readonly(t)
    ref = weakref.ref(t)
    del t
    assert ref() is None


def test_readonly_module_parameters():
    lin = torch.nn.Linear(2, 2)
    immutorch.readonly(lin)
    assert immutorch.is_readonly(lin.weight) and immutorch.is_readonly(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin(torch.ones(1, 2)).sum().backward()
    with pytest.raises(immutorch.ImmutableTensorError, match="marked read-only"):
        with immutorch.guard(torch.empty(0)):
            opt.step()


def test_environment_variable_overrides_code(monkeypatch):
    monkeypatch.setenv("IMMUTORCH_MODE", "off")
    x = torch.zeros(2)
    immutorch.immutable_inputs(writes)(x)  # off: the write goes ahead
    assert x[0] == 7
    monkeypatch.setenv("IMMUTORCH_MODE", "bogus")
    with pytest.raises(ValueError, match="IMMUTORCH_MODE"):
        immutorch.immutable_inputs(writes)(x)


def test_public_surface_is_small_and_typed():
    assert sorted(immutorch.__all__) == sorted(
        [
            "CloneStats",
            "Guard",
            "GuardSaved",
            "ImmutableTensorError",
            "Mode",
            "MutationWarning",
            "Scope",
            "clone_stats",
            "guard",
            "guard_saved",
            "immutable_inputs",
            "is_readonly",
            "readonly",
            "watch_modules",
            "writable",
        ]
    )
    import importlib.resources

    assert (importlib.resources.files("immutorch") / "py.typed").is_file()


def test_mypy_sees_the_original_signature(tmp_path):
    mypy = pytest.importorskip("mypy.api")
    src = tmp_path / "use.py"
    src.write_text(
        textwrap.dedent(
            """
            import torch, immutorch

            @immutorch.immutable_inputs
            def f(x: torch.Tensor, k: int) -> torch.Tensor:
                return x * k

            @immutorch.immutable_inputs(mode="clone")
            def g(x: torch.Tensor) -> float:
                return 1.0

            reveal_type(f)
            reveal_type(g)
            f(torch.ones(1), "no")
            """
        )
    )
    out, _, _ = mypy.run([str(src), "--no-incremental", "--follow-imports=silent"])
    assert "def (x: torch._tensor.Tensor, k: int) -> torch._tensor.Tensor" in out
    assert "def (x: torch._tensor.Tensor) -> float" in out
    assert 'Argument 2 to "f" has incompatible type "str"; expected "int"' in out


def test_public_classes_show_the_public_path(tmp_path):
    assert immutorch.ImmutableTensorError.__module__ == "immutorch"
    assert immutorch.MutationWarning.__module__ == "immutorch"
    assert issubclass(immutorch.ImmutableTensorError, RuntimeError)
    assert issubclass(immutorch.MutationWarning, UserWarning)
    test = tmp_path / "test_w.py"
    test.write_text(
        textwrap.dedent(
            """
            import torch, immutorch

            def test_it():
                x = torch.zeros(2)
                immutorch.immutable_inputs(mode="warn")(lambda t: t.add_(1))(x)
            """
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::immutorch.MutationWarning",
            str(test),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "immutorch.MutationWarning" in proc.stdout


@pytest.mark.parametrize(
    "module",
    [
        "_boundaries",
        "_backends.mode",
        "_backends.scoped",
        "_policy",
        "_guard",
        "_decorator",
        "_pytest_plugin",
        "_audit",
        "_compiled",
        "_clone",
        "_registry",
        "_readonly",
        "_schema",
        "_storage",
        "_errors",
        "nn",
    ],
)
def test_each_module_imports_first_without_a_cycle(module):
    # The plugin imports _boundaries first, the CLI _audit: any order must work.
    proc = subprocess.run(
        [sys.executable, "-c", f"import immutorch.{module}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
