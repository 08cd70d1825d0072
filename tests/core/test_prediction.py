"""The one prediction path: dtype cast, dispatch to a module or a Predictor, and the per-sample error."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffalign.noise import DDPMProcess
from diffalign.prediction import Predictor, denoising_errors, predict


class ScaleNet(nn.Module):
    """prediction = w * noisy + conditioning bias; records the dtypes it was called with."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.seen: list[torch.dtype] = []

    def forward(self, noisy: Tensor, bias: Tensor) -> Tensor:
        self.seen.append(noisy.dtype)
        return self.weight.to(noisy.dtype) * noisy + bias.view(-1, 1, 1, 1)


class FakeBackbone:
    """The calling convention only: predict(network, noisy, t, conditioning) -> network(noisy, bias)."""

    def __init__(self) -> None:
        self.noise = DDPMProcess(torch.linspace(0.99, 0.01, 10, dtype=torch.float64).float(), "epsilon")

    def predict(self, network: nn.Module, noisy: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        return network(noisy, conditioning["bias"])


class HalvedReference:
    """A Predictor that runs a frozen network and halves its output (so dispatch is visible)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    @torch.no_grad()
    def predict(self, backbone, noisy, timesteps, conditioning):
        return 0.5 * backbone.predict(self.network, noisy, timesteps, conditioning)


def test_predict_casts_the_inputs_to_the_weights_dtype_only_when_asked():
    backbone, net = FakeBackbone(), ScaleNet(2.0)
    noisy = torch.ones(2, 1, 2, 2)
    conditioning = {"bias": torch.tensor([0.0, 1.0]), "ids": torch.tensor([3, 4])}
    out = predict(backbone, net, noisy, torch.tensor([1, 2]), conditioning)
    assert out.dtype == torch.float32 and net.seen[-1] == torch.float32
    out = predict(backbone, net, noisy, torch.tensor([1, 2]), conditioning, dtype=torch.bfloat16)
    assert net.seen[-1] == torch.bfloat16 and out.dtype == torch.bfloat16
    assert conditioning["bias"].dtype == torch.float32, "the caller's conditioning is not changed in place"
    assert out.float()[1].flatten().tolist() == [3.0] * 4  # 2 * 1 + 1


def test_a_predictor_decides_how_it_runs():
    backbone, net = FakeBackbone(), ScaleNet(2.0)
    reference = HalvedReference(net)
    assert isinstance(reference, Predictor) and not isinstance(net, Predictor)
    noisy = torch.ones(1, 1, 2, 2, requires_grad=True)
    out = predict(backbone, reference, noisy, torch.tensor([0]), {"bias": torch.tensor([0.0])})
    assert out.flatten().tolist() == [1.0] * 4 and not out.requires_grad


def test_denoising_errors_are_the_mean_squared_error_against_the_process_target_by_hand():
    """eps-prediction at alpha_bar: x_t = sqrt(ab) x0 + sqrt(1-ab) eps; error = mean((w x_t + b - eps)^2) per sample."""
    backbone, net = FakeBackbone(), ScaleNet(0.5)
    x0 = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    eps = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]], [[[-1.0, 0.0], [0.0, 1.0]]]])
    t = torch.tensor([0, 9])
    bias = torch.tensor([0.25, -0.5])
    errors = denoising_errors(backbone, net, x0, eps, t, {"bias": bias})
    expected = []
    for i, ab in enumerate([0.99, 0.01]):
        x_t = ab**0.5 * x0[i] + (1 - ab) ** 0.5 * eps[i]
        expected.append(((0.5 * x_t + bias[i] - eps[i]) ** 2).mean().item())
    assert errors.shape == (2,)
    torch.testing.assert_close(errors, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    errors.sum().backward()
    assert net.weight.grad is not None and net.weight.grad != 0, "the policy's errors keep their graph"
