"""An optimized module is for inference: its outputs never require grad, and an input that requires grad
(with grad mode on) is refused with a clear error instead of gradients that would silently be None."""

import pytest
import torch
import torch.nn as nn

from graphopt import InputError, load, optimize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    opt = optimize(model, (x,))
    folder = tmp_path_factory.mktemp("saved")
    opt.save(folder / "m")
    return model, opt, load(folder / "m"), x


def test_outputs_do_not_require_grad_and_neither_do_the_weights(pair):
    """The optimized module's weights are graphopt's copy, without grad as a loaded module's are; the user's keep
    theirs."""
    model, opt, loaded, x = pair
    assert all(p.requires_grad for p in model.parameters())
    for module in (opt, loaded):
        assert not any(t.requires_grad for t in (*module.parameters(), *module.buffers()))
        out = module(x)
        assert not out.requires_grad and out.grad_fn is None
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_an_input_that_requires_grad_is_refused_under_grad_mode(pair):
    model, opt, loaded, x = pair
    wants = x.clone().requires_grad_()
    for module in (opt, loaded):
        with pytest.raises(InputError, match="input 0 requires grad") as e:
            module(wants)
        assert "torch.no_grad()" in e.value.hint and "eager model" in e.value.hint


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_same_input_runs_without_grad_mode(pair, context):
    model, opt, _, x = pair
    wants = x.clone().requires_grad_()
    with context():
        out = opt(wants)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert not out.requires_grad
    torch.testing.assert_close(opt(wants.detach()), out, rtol=0, atol=0)  # or detached


def test_hooks_on_the_module_and_on_every_module_run_on_its_calls(pair):
    """An optimized (or loaded) module is an nn.Module to the tools around it: a hook on the module, or on every
    module, runs on each call, and a keyword argument meets forward's signature."""
    model, opt, loaded, x = pair
    seen: list[str] = []
    for module in (opt, loaded):
        want = module.forward(x)
        torch.testing.assert_close(module(x), want)
        handles = [module.register_forward_pre_hook(lambda m, args: seen.append("pre")),
                   module.register_forward_hook(lambda m, args, out: seen.append("post"))]
        torch.testing.assert_close(module(x), want)
        assert seen == ["pre", "post"]
        for handle in handles:
            handle.remove()
        handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
        try:
            torch.testing.assert_close(module(x), want)
        finally:
            handle.remove()
        assert seen == ["pre", "post", type(module).__name__]
        module(x)
        assert len(seen) == 3  # (removed: none runs)
        seen.clear()
        with pytest.raises(TypeError):
            module(x=x)
