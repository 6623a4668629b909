"""An example user model for hpcfed: a small ResNet with BatchNorm, 1-D or 2-D by the data.

Use it with ``model.name: "user_model:small_resnet"`` (see configs/user-model.yaml); this folder must be
on PYTHONPATH on every node, e.g. ``PYTHONPATH=examples mpiexec -n 4 python -m mpi4py -m hpcfed run
configs/user-model.yaml``. hpcfed calls the factory with ``model.kwargs`` plus ``sample_shape`` and
``num_classes`` (each only because the signature names it), after seeding torch, and checks that one
sample of shape (1, *sample_shape) gives logits of shape (1, num_classes).
"""

from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (projected by a 1x1 convolution when the shape changes)."""

    def __init__(self, conv: type, norm: type, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(),
                                  conv(cout, cout, 3, 1, 1, bias=False), norm(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.skip(x)).relu()


def small_resnet(sample_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """Stem, two residual blocks (the second halves the resolution and doubles the width), average pool, linear."""
    two_d = len(sample_shape) == 3
    conv, norm, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if two_d
                        else (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d))
    return nn.Sequential(
        conv(sample_shape[0], width, 3, 1, 1, bias=False), norm(width), nn.ReLU(),
        Block(conv, norm, width, width, 1),
        Block(conv, norm, width, 2 * width, 2),
        pool(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
