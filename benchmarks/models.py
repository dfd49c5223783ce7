"""Models for the end-to-end benchmark (`model_bench`).

* `resnet50`, `resnet18`, `mobilenet_v2`: torchvision's, untrained, when torchvision imports (it is on
  the GPU machines; CPU machines may lack it, or have a CUDA build that does not import: then these
  are skipped with the reason).
* `tiny_resnet50`, `tiny_resnet18`: the same ResNet module structure, built here at small widths for the
  CPU smoke run: residual blocks with torchvision's layout (Bottleneck: 1x1, 3x3, 1x1 convs; BasicBlock:
  two 3x3 convs; a projection `downsample` = 1x1 conv + BN where the shape changes), one `self.relu`
  module (ReLU(inplace=True)) called several times per block, and the residual added in place
  (`out += identity`), so `tritonbn.fuse_model` meets the same patterns as in torchvision's models.
"""

from __future__ import annotations

import functools

TORCHVISION = ("resnet50", "resnet18", "mobilenet_v2")
# name -> (block, blocks per stage, stage widths); the stem has widths[0] channels. Few BatchNorms keep
# the Triton interpreter's CPU time to seconds (~0.4 s per BN layer and training step): tiny_resnet50
# has 5 (stem, one Bottleneck with a projection shortcut), tiny_resnet18 6 (stem, two BasicBlocks, the
# second strided with a projection shortcut).
TINY = {
    "tiny_resnet50": ("bottleneck", (1,), (4,)),
    "tiny_resnet18": ("basic", (1, 1), (4, 8)),
}
MODELS = (*TORCHVISION, *TINY)


def build(torch, name: str, num_classes: int):
    """(model, source) for `name`, in train mode on the CPU, or (None, reason) when it cannot be built."""
    if name in TINY:
        kind, blocks, widths = TINY[name]
        return _classes(torch)["ResNet"](kind, blocks, widths, num_classes), "benchmarks.models"
    if name not in TORCHVISION:
        return None, f"unknown model {name!r} (choose from {', '.join(MODELS)})"
    try:
        import torchvision
    except Exception as e:  # missing, or a build for another torch (e.g. CUDA-only operators)
        return None, f"torchvision unavailable: {type(e).__name__}: {str(e).strip()[:200]}"
    return getattr(torchvision.models, name)(
        num_classes=num_classes
    ), f"torchvision {torchvision.__version__}"


def drop_dropout(torch, model) -> int:
    """Replace every nn.Dropout with nn.Identity (mobilenet_v2's classifier has one): the variants of a
    benchmark run draw different random masks otherwise, and their losses could not be compared step by
    step. Returns how many were replaced."""
    nn = torch.nn
    n = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(mod, child_name, nn.Identity())
                n += 1
    return n


@functools.cache
def _classes(torch) -> dict:
    nn = torch.nn

    def conv(cin, cout, k, stride=1):
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin, width, stride, downsample):
            super().__init__()
            self.conv1 = conv(cin, width, 3, stride)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv(width, width, 3)
            self.bn2 = nn.BatchNorm2d(width)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x if self.downsample is None else self.downsample(x)
            return self.relu(out)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, width, stride, downsample):
            super().__init__()
            self.conv1 = conv(cin, width, 1)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = conv(width, width, 3, stride)  # the stride sits on the 3x3 conv, as in torchvision
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = conv(width, width * 4, 1)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            out += x if self.downsample is None else self.downsample(x)
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self, kind, blocks, widths, num_classes):
            super().__init__()
            block = Bottleneck if kind == "bottleneck" else BasicBlock
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            cin = widths[0]
            for i, (n, width) in enumerate(zip(blocks, widths)):
                stride = 1 if i == 0 else 2
                layer = []
                for j in range(n):
                    s = stride if j == 0 else 1
                    down = None
                    if s != 1 or cin != width * block.expansion:
                        down = nn.Sequential(
                            nn.Conv2d(cin, width * block.expansion, 1, stride=s, bias=False),
                            nn.BatchNorm2d(width * block.expansion),
                        )
                    layer.append(block(cin, width, s, down))
                    cin = width * block.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(cin, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

            self.stages = len(widths)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(self.stages):
                x = getattr(self, f"layer{i + 1}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return {"ResNet": ResNet, "BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
