"""Tests for the optimizee architectures in training/optimizees.py: sizes, outputs, gradients."""

import pytest
import torch

from training.optimizees import conv_cifar, conv_large_mnist, resnet20


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# Counted by hand from the architectures (weights + biases; batch-norm scale and shift):
# conv_large_mnist: 320 + 9248 + 25632 + 25632 + 1290;
# conv_cifar: 448 + 12832 + 8010;
# resnet20: stem 432 + 32, stages 14016 + 51072 + 203520, classifier 650 (option-A shortcuts have
# no parameters), the 0.27M of He et al. 2016, table 6.
@pytest.mark.parametrize(
    "make_model, inputs, parameters",
    [
        (conv_large_mnist, 28 * 28, 62_122),
        (conv_cifar, 3 * 32 * 32, 21_290),
        (resnet20, 3 * 32 * 32, 269_722),
    ],
    ids=["conv-large-mnist", "conv-cifar", "resnet20"],
)
def test_parameter_count_output_shape_and_backward(make_model, inputs, parameters):
    torch.manual_seed(0)
    model = make_model()
    assert _parameter_count(model) == parameters

    images = torch.rand(4, inputs)
    labels = torch.tensor([0, 3, 7, 9])
    logits = model(images)
    assert logits.shape == (4, 10)

    torch.nn.functional.cross_entropy(logits, labels).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make_model", [conv_cifar, resnet20], ids=["conv-cifar", "resnet20"])
def test_cifar_models_take_flattened_or_image_shaped_input(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model(images.flatten(1)))


def test_resnet20_classes_and_zero_padded_shortcut():
    torch.manual_seed(0)
    model = resnet20(num_classes=100)
    assert model(torch.rand(2, 3 * 32 * 32)).shape == (2, 100)

    # Option A: no 1x1 projections anywhere, only 3x3 convs besides the classifier.
    kernel_sizes = {m.kernel_size for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert kernel_sizes == {(3, 3)}

    # A downsampling block whose residual branch outputs zero passes x[::2, ::2] through its first
    # channels and zeros in the appended ones, then the ReLU.
    block = model[7]  # The first block of the second stage.
    torch.nn.init.zeros_(block.residual[4].weight)
    torch.nn.init.zeros_(block.residual[4].bias)
    x = torch.randn(2, 16, 32, 32)
    out = block(x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, :16], torch.relu(x[:, :, ::2, ::2]))
    assert out[:, 16:].abs().max() == 0
