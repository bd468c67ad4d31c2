"""PreparedLaunch: JIT calls first, then the compiled kernel's launcher while the arguments specialise the same
way (CPU: a stand-in kernel records both paths; the GPU tests run the real kernels through it every step)."""

import pytest
import torch

from turboquant.kernels import launch as launch_module
from turboquant.kernels.launch import PreparedLaunch


@pytest.fixture
def stand_in_driver(monkeypatch):
    """Triton's active driver replaced by one that knows a device 3 and its stream 103 (no GPU needed)."""
    monkeypatch.setattr(launch_module, "driver", _Driver)


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "function", "metadata"

    def run(self, *args):
        self.log.append(("run", args))


class _Kernel:
    """A stand-in triton.jit function: arguments X, N, K (constexpr), Y; the JIT call is logged and returns a
    compiled kernel (or None, as the CPU interpreter does)."""

    arg_names = ["X", "N", "K", "Y"]
    __name__ = "kernel"

    def __init__(self, compiles=True):
        self.log, self.compiles = [], compiles

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log) if self.compiles else None

        return call


class _Driver:
    class active:
        get_current_device = staticmethod(lambda: 3)
        get_current_stream = staticmethod(lambda device: 100 + device)


def _launch(kernel):
    return PreparedLaunch(kernel, (5,), dict(K=4, num_warps=2), dict(N=7))


@pytest.mark.usefixtures("stand_in_driver")
def test_jit_calls_first_then_the_compiled_launcher():
    kernel = _Kernel()
    launch = _launch(kernel)
    x, y = torch.zeros(8), torch.ones(8)
    launch(x, y)  # a plan launched once keeps nothing
    assert kernel.log == [("jit", (5, 1, 1), (x, 7, y), dict(K=4, num_warps=2))]
    launch(x, y)  # the second call keeps the compiled kernel
    launch(y, x)
    assert [e[0] for e in kernel.log] == ["jit", "jit", "run"]
    tag, args = kernel.log[-1]
    assert args[:9] == (5, 1, 1, 103, "function", "metadata", None, None, None)
    assert args[9:] == (y, 7, 4, x)  # every parameter in order, the constexpr included


@pytest.mark.usefixtures("stand_in_driver")
def test_a_call_that_specialises_otherwise_takes_the_jit_call():
    kernel = _Kernel()
    launch = _launch(kernel)
    x = torch.zeros(16)
    launch(x, x)
    launch(x, x)
    launch(x[1:], x)  # 4 bytes past a 16-byte boundary
    assert [e[0] for e in kernel.log] == ["jit", "jit", "jit"]
    launch(x[1:], x)  # the new specialisation is kept
    launch(x.half(), x)  # another dtype
    launch(x, x, jit=True)  # on request
    assert [e[0] for e in kernel.log] == ["jit", "jit", "jit", "run", "jit", "jit"]


@pytest.mark.usefixtures("stand_in_driver")
def test_integers_by_value_floats_by_type():
    kernel = _Kernel()
    launch = PreparedLaunch(kernel, (1,), dict(K=0), dict(X=torch.zeros(4)))
    launch(16, 0.5)
    launch(16, 0.5)
    launch(16, 2.0)
    launch(1, 2.0)
    assert [e[0] for e in kernel.log] == ["jit", "jit", "run", "jit"]


@pytest.mark.usefixtures("stand_in_driver")
def test_launch_hooks_and_the_interpreter_take_the_jit_call(monkeypatch):
    from triton import knobs

    kernel = _Kernel()
    launch = _launch(kernel)
    x = torch.zeros(8)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    for _ in range(3):
        launch(x, x)
    assert [e[0] for e in kernel.log] == ["jit"] * 3
    interpreted = _Kernel(compiles=False)
    launch = _launch(interpreted)
    for _ in range(3):
        launch(x, x)
    assert [e[0] for e in interpreted.log] == ["jit"] * 3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"kernel has no arguments \['Z'\]"):
        PreparedLaunch(_Kernel(), (1,), {}, dict(Z=1))
    with pytest.raises(TypeError, match="kernel: 2 arguments, got 1"):
        _launch(_Kernel())(torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the CPU interpreter compiles nothing")
def test_a_cache_step_through_prepared_launches_equals_the_jit_call():
    """On the GPU a cache's third decode step goes through the compiled launchers (the first two take Triton's JIT
    calls); its output equals the first's bit for bit."""
    from turboquant.cache import KVCacheConfig, TurboQuantKVCache

    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = TurboQuantKVCache(KVCacheConfig(head_dim=128, key_bits=4, value_bits=4), 2, 4, device="cuda")
    k = torch.randn(2, 4, 300, 128, device="cuda", generator=gen)
    cache.append(k, torch.randn(2, 4, 300, 128, device="cuda", generator=gen))
    q = torch.randn(2, 16, 1, 128, device="cuda", generator=gen)
    first = cache.attend(q, after=True)
    assert torch.equal(cache.attend(q, after=True), first)
    (plan,) = cache._decode_plans.values()
    jit_calls = []
    kernel = plan.split_launch._kernel

    class Spy:  # counts the split kernel's JIT calls
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            jit_calls.append(grid)
            return kernel[grid]

    plan.split_launch._kernel = Spy()
    assert torch.equal(cache.attend(q, after=True), first)
    assert jit_calls == []
