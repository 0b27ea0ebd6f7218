"""FREM under torch.compile acts in training and is gone in eval and after detach, whatever the order.

Dynamo does not guard on module hooks by default, so a model compiled before
``frem.attach`` would keep its FREM-less graph (and a twin of the same class
could reuse a FREM graph). Each scenario runs in a fresh interpreter: what
matters is what Dynamo compiled before frem first attached anything.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # a fresh interpreter each: left out of `-m "not slow"`

PRELUDE = """
import sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {tests!r})
import torch
import frem
from handwritten import PlainUNet

torch.manual_seed(0)
x = torch.randn(2, 1, 32, 32)

def compiled(model):
    return torch.compile(model, backend="aot_eager")

def acts(model, run, reference):
    \"\"\"FREM changes the training output and leaves the eval output exactly as the bare model's.\"\"\"
    with torch.no_grad():
        train = run(x) if model.train() is not None else None
        evaluated = run(x) if model.eval() is not None else None
        model.train()
    return not torch.allclose(train, reference(x)) and torch.equal(evaluated, reference(x))

def same(a, b):
    with torch.no_grad():
        return torch.equal(a(x), b(x))
"""

SCENARIOS = {
    # compiled and run first; FREM attached to the original module afterwards
    "attach_after_the_first_compiled_call": """
        model = PlainUNet().train(); bare = PlainUNet().train(); bare.load_state_dict(model.state_dict())
        run = compiled(model)
        assert same(run, bare)
        frem.attach(model, "bottleneck", B=8, X=100.0, example_input=x)
        assert acts(model, run, bare), "FREM attached after compiling did not act"
        frem.detach(model)
        assert same(run, bare), "FREM still acts after detach"
    """,
    # attach, detach, attach again on one compiled model: every change of hooks reaches the graph
    "attach_detach_and_attach_again": """
        model = PlainUNet().train(); bare = PlainUNet().train(); bare.load_state_dict(model.state_dict())
        run = compiled(model)
        for round in range(2):
            handle = frem.attach(model, "bottleneck", B=8, X=100.0, example_input=x)
            assert acts(model, run, bare), f"FREM attached again (round {round}) did not act"
            frem.detach(model)
            assert same(run, bare), f"FREM still acts after detach (round {round})"
    """,
    # attached through the compiled wrapper itself
    "attach_on_the_compiled_model": """
        model = PlainUNet().train(); bare = PlainUNet().train(); bare.load_state_dict(model.state_dict())
        run = compiled(model)
        run(x)
        frem.attach(run, "bottleneck", B=8, X=100.0, example_input=x)
        assert acts(model, run, bare)
    """,
    # another instance of the class was compiled and run before this one got FREM
    "a_fresh_instance_after_a_compiled_twin": """
        twin = PlainUNet().train()
        with torch.no_grad():
            compiled(twin)(x)
        model = PlainUNet().train(); model.load_state_dict(twin.state_dict())
        frem.attach(model, "bottleneck", B=8, X=100.0, example_input=x)
        assert acts(model, compiled(model), twin), "the fresh instance ran its twin's graph"
        assert same(compiled(twin), twin), "the bare twin picked up FREM"
    """,
    # attached before Dynamo was ever imported: compiled afterwards, twins must not share graphs
    "attach_before_dynamo_is_imported": """
        assert "torch._dynamo" not in sys.modules
        model = PlainUNet().train(); twin = PlainUNet().train(); twin.load_state_dict(model.state_dict())
        frem.attach(model, "bottleneck", B=8, X=100.0, example_input=x)
        assert "torch._dynamo" not in sys.modules, "attach imported Dynamo"
        assert acts(model, compiled(model), twin)
        assert same(compiled(twin), twin), "the bare twin picked up FREM"
        import torch._dynamo
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    """,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_frem_acts_under_torch_compile(scenario):
    script = PRELUDE.format(tests=str(TESTS)) + textwrap.dedent(SCENARIOS[scenario]) + "\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_deepest_entry_of_a_list_output_is_chosen_inside_a_fullgraph_trace():
    """attach(entry=None) on a layer returning a list picks the deepest map at the first training call, which
    under torch.compile is inside the trace: with torch 2.13, min(..., key=...) there broke the graph."""
    import torch
    from torch import nn

    import frem

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)

        def forward(self, x):
            y = self.a(x)
            return [y, self.b(y)]

    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(2, 1, 16, 16)
    handle = frem.attach(model, "", B=4, X=10.0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    shallow, deep = compiled(x)
    with torch.no_grad():
        bare = [model.a(x), model.b(model.a(x))]
    assert handle.num_channels == 16 and torch.equal(shallow, bare[0])  # the 16-channel 4x4 map, not the first
    scale = torch.ones(16)
    scale[handle.channels] = 10.0
    assert torch.allclose(deep, bare[1] * scale.view(1, -1, 1, 1))
