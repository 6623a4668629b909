"""Models by import path, the built-in ResNet and MNIST-1D CNN, FlatModel buffers and batched evaluation."""

import itertools
import sys

import pytest
import torch
from torch import nn

from hpcfed.config import ModelConfig, load_config
from hpcfed.errors import HpcfedError
from hpcfed.models import FlatModel, build_model, check_model, load_parameters, save_model

FACTORIES = """
import torch
from torch import nn

def net(sample_shape, num_classes, width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(sample_shape).prod()), width), nn.ReLU(),
                         nn.Linear(width, num_classes))

def kwargs_only(**kwargs):       # like torchvision.models.resnet18: num_classes only through **kwargs
    return nn.Sequential(nn.Flatten(), nn.Linear(64, kwargs.get("num_classes", 1000)))

class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(1), nn.Linear(40, num_classes)
    def forward(self, x):
        return self.fc(self.bn(x).flatten(1))

class Holder:
    factory = staticmethod(net)

not_callable = 3

def raises(**kwargs):
    raise ValueError("boom\\nsecond line")

def not_a_module(**kwargs):
    return 3

def frozen(**kwargs):
    return nn.ReLU()

def bad_forward(**kwargs):
    return nn.Linear(3, 10)

def bad_output(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
"""


_COUNTER = itertools.count()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A fresh module of factories on sys.path; returns its name."""
    name = f"user_factories_{next(_COUNTER)}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    (tmp_path / f"{name}_broken.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, f"{name}_broken"):
        sys.modules.pop(module, None)


def test_import_path_model_gets_kwargs_shape_and_classes(plugin):
    cfg = ModelConfig(name=f"{plugin}:net", kwargs={"width": 7})
    first, second = build_model(cfg, (1, 8, 8), 10, seed=3), build_model(cfg, [1, 8, 8], 10, seed=3)
    assert first[1].out_features == 7 and first[3].out_features == 10
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    other = build_model(cfg, (1, 8, 8), 10, seed=4)
    assert not torch.equal(first[1].weight, other[1].weight)
    assert build_model(ModelConfig(name=f"{plugin}:Holder.factory"), (1, 40), 3, seed=0)(torch.zeros(2, 1, 40)).shape == (2, 3)
    assert isinstance(build_model(ModelConfig(name=f"{plugin}:Net"), (1, 40), 4, seed=0), nn.Module)


def test_factory_without_named_parameters_takes_kwargs_only(plugin):
    model = build_model(ModelConfig(name=f"{plugin}:kwargs_only", kwargs={"num_classes": 10}), (1, 8, 8), 10, 0)
    assert model[1].out_features == 10
    with pytest.raises(HpcfedError, match=r"gave output \(1, 1000\); expected logits of shape \(1, 10\)"):
        build_model(ModelConfig(name=f"{plugin}:kwargs_only"), (1, 8, 8), 10, 0)


@pytest.mark.parametrize("attr, message", [
    ("missing", "has no attribute 'missing'"),
    ("not_callable", "'not_callable' is a int, not a callable factory"),
    ("raises", "the factory raised ValueError: boom second line"),
    ("not_a_module", "the factory returned a int, not a torch.nn.Module"),
    ("frozen", "the model has no trainable parameters"),
    ("bad_forward", r"the forward pass on an input of shape \(1, 1, 8, 8\) failed: RuntimeError: "),
    ("bad_output", r"an input of shape \(1, 1, 8, 8\) gave output \(1, 5\); expected logits of shape \(1, 10\)"),
])
def test_bad_factories_are_one_line_naming_model_name(plugin, attr, message):
    with pytest.raises(HpcfedError, match=message) as info:
        build_model(ModelConfig(name=f"{plugin}:{attr}"), (1, 8, 8), 10, seed=0)
    assert str(info.value).startswith(f"model.name '{plugin}:{attr}': ") and "\n" not in str(info.value)


def test_unimportable_modules_name_the_import_error(plugin):
    with pytest.raises(HpcfedError, match="cannot import module 'no_such_module_q7' "
                                          r"\(ModuleNotFoundError: No module named 'no_such_module_q7'\)"):
        build_model(ModelConfig(name="no_such_module_q7:f"), (1, 8, 8), 10, 0)
    with pytest.raises(HpcfedError, match=f"model.name '{plugin}_broken:f': cannot import module .*"
                                          "No module named 'not_a_real_dependency_xyz'"):
        build_model(ModelConfig(name=f"{plugin}_broken:f"), (1, 8, 8), 10, 0)


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet50", "model.name: Input should be 'mlp', 'cnn', 'resnet' or 'cnn1d_small', or an import "
                            "path 'package.module:function' \\(got 'resnet50'\\)"),
    ("model.name=a b:c", "model.name: Input should be"),
    ("model.depth=10", r"model.depth: must be 6n\+2"),
    ("model.kwargs={width: 3}", "model.kwargs: only used with an import-path model.name"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
])
def test_bad_model_config_is_one_line(override, message):
    with pytest.raises(HpcfedError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_model_config_defaults_and_import_path():
    cfg = load_config(None, ["model.name=torchvision.models:resnet18", "model.kwargs.num_classes=10"])
    assert cfg.model.kwargs == {"num_classes": 10} and cfg.model.depth == 8 and cfg.train.eval_batch_size == 1024


def test_check_model_leaves_buffers_and_mode_alone():
    model = build_model(ModelConfig(name="resnet"), (1, 8, 8), 10, seed=0)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))   # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model(model, (1, 8, 8), 10)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(HpcfedError, match=r"model.name 'model': an input of shape \(1, 1, 8, 8\) gave output"):
        check_model(model, (1, 8, 8), 7)


def test_cnn1d_small_is_the_mnist1d_paper_cnn():
    model = build_model(ModelConfig(name="cnn1d_small"), (1, 40), 10, seed=0)
    convs = [m for m in model if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(25, 5, 2), (25, 3, 2), (25, 3, 2)]
    assert sum(p.numel() for p in model.parameters()) == 5210
    with pytest.raises(HpcfedError, match=r"model.name 'cnn1d_small': needs samples of shape \(C, L\)"):
        build_model(ModelConfig(name="cnn1d_small"), (1, 8, 8), 10, seed=0)


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8), (3, 5, 7)])
def test_resnet_builds_and_trains_one_step(shape):
    cfg = ModelConfig(name="resnet", depth=14, hidden=64)
    model = FlatModel(build_model(cfg, shape, 10, seed=1))
    again = FlatModel(build_model(cfg, shape, 10, seed=1))
    assert model.digest() == again.digest() and model.buffer_size > 0
    norm = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    assert sum(isinstance(m, norm) for m in model.module.modules()) == 1 + 2 * 6 + 2   # stem, blocks, projections
    assert model.module[0].out_channels == 8   # width hidden // 8
    x, y = torch.randn(8, *shape), torch.arange(8) % 10
    loss = model.backward(x, y)
    before = model.params.clone()
    torch.optim.SGD(model.module.parameters(), lr=0.1).step()
    assert loss > 0 and not torch.equal(before, model.params)
    assert model.digest() != again.digest()


def test_resnet_depth_and_width_rule():
    sizes = {depth: FlatModel(build_model(ModelConfig(name="resnet", depth=depth), (3, 32, 32), 10, 0)).size
             for depth in (8, 20)}
    assert sizes[8] < sizes[20] == 272_474   # ResNet-20 (1x1 projection shortcuts): about 0.27M parameters


def test_buffers_round_trip_bit_exactly():
    model = FlatModel(build_model(ModelConfig(name="resnet"), (1, 40), 10, seed=0))
    names = [n for n, _ in model.module.named_buffers()]
    assert model.buffer_size == sum(b.numel() for b in model.module.buffers())
    assert any(n.endswith("num_batches_tracked") for n in names)
    saved = {n: b.clone() for n, b in model.module.named_buffers()}
    start, digest = model.export_buffers(), model.digest()
    assert start.dtype == torch.float32 and start.shape == (model.buffer_size,)
    params = model.params.clone()
    model.module.train()
    with torch.no_grad():
        model.module(torch.randn(32, 1, 40) * 3 + 1)   # a train-mode forward moves the running statistics
    assert torch.equal(params, model.params) and model.digest() != digest
    moved = model.export_buffers()
    assert not torch.equal(moved, start) and torch.equal(moved, model.export_buffers())
    model.import_buffers(start)
    after = dict(model.module.named_buffers())
    assert all(after[n].dtype == saved[n].dtype and torch.equal(after[n], saved[n]) for n in names)
    assert model.digest() == digest
    model.import_buffers(moved)
    assert model.digest() != digest
    with pytest.raises(ValueError, match="import_buffers"):
        model.import_buffers(start[:-1])
    plain = FlatModel(build_model(ModelConfig(name="mlp"), (1, 40), 10, 0))
    assert plain.buffer_size == 0 and plain.export_buffers().numel() == 0
    plain.import_buffers(torch.zeros(0))


def test_evaluate_in_batches_equals_unbatched_and_casts():
    model = FlatModel(build_model(ModelConfig(name="resnet"), (1, 8, 8), 10, seed=0))
    model.module.train()
    with torch.no_grad():
        model.module(torch.rand(64, 1, 8, 8) * 255)   # running statistics for 0..255 pixels
    buffers = model.export_buffers()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (101, 1, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (101,), generator=gen)
    whole = model.evaluate(x.float(), y)
    for batch_size in (1, 7, 100, 101, 4096):
        loss, accuracy = model.evaluate(x, y, batch_size=batch_size)
        assert loss == pytest.approx(whole[0], rel=1e-5) and accuracy == pytest.approx(whole[1])
    assert torch.equal(buffers, model.export_buffers())   # eval mode: statistics untouched
    assert model.backward(x[:8], y[:8]) == pytest.approx(model.backward(x[:8].float(), y[:8]))


def test_save_model_keeps_buffers(tmp_path):
    model = build_model(ModelConfig(name="resnet"), (1, 40), 10, seed=0)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 40))
    save_model(tmp_path / "model.h5", model, {"rounds": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]
    other = build_model(ModelConfig(name="resnet"), (1, 40), 10, seed=9)
    load_parameters(tmp_path / "model.h5", other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_example_user_model_builds(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "user-model.yaml"))
    for shape in ((1, 8, 8), (1, 40)):
        model = FlatModel(build_model(cfg.model, shape, 10, seed=0))
        assert model.buffer_size > 0
        model.backward(torch.randn(4, *shape), torch.arange(4))
    sys.modules.pop("user_model", None)
