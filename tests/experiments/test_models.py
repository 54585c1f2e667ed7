"""Tests of the experiment models: shapes, parameter counts, padding handling."""

import pytest
import torch

from sewa.experiments import models as M


def test_resnet8_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = M.resnet8(10, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert M.resnet8(100, 3)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # stem conv+BN, block 16->16, block 16->32 (+1x1 shortcut), block 32->64 (+1x1), head
    expected = (9 * 16 + 32) + (2 * 9 * 16 * 16 + 2 * 32) \
        + (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32 + 3 * 64) \
        + (9 * 32 * 64 + 9 * 64 * 64 + 32 * 64 + 3 * 128) + (64 * 10 + 10)
    assert M.count_parameters(model) == expected == 77754
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 9


def test_resnet8_trains_one_step():
    torch.manual_seed(0)
    model = M.resnet8(3, in_channels=1)
    x, y = torch.randn(8, 1, 12, 12), torch.arange(8) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_small_cnn_shapes_parameter_count_and_no_batchnorm():
    model = M.small_cnn(10, 1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    expected = (9 * 16 + 16) + (9 * 16 * 32 + 32) + (32 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    assert M.count_parameters(model) == expected == 206922
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert M.small_cnn(3, 3, size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        M.small_cnn(10, 1, size=30)


def test_text_classifier_padded_equals_bag_and_ignores_padding():
    torch.manual_seed(0)
    model = M.TextClassifier(vocab_size=20, num_classes=4, embed_dim=8, hidden=8)
    padded = torch.tensor([[2, 3, 4, 0, 0], [5, 0, 0, 0, 0]])
    flat, offsets = torch.tensor([2, 3, 4, 5]), torch.tensor([0, 3])
    out = model(padded)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, model(flat, offsets))
    torch.testing.assert_close(out, model(padded[:, :3]))


def test_tiny_transformer_masks_padding():
    torch.manual_seed(0)
    model = M.TinyTransformer(vocab_size=30, num_classes=4, max_len=16).eval()
    assert sum(isinstance(m, torch.nn.TransformerEncoderLayer) for m in model.modules()) == 2
    tokens = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = model(tokens)
        assert out.shape == (3, 4) and torch.isfinite(out).all()
        torch.testing.assert_close(out[:2], model(tokens[:2, :3]))


def test_bc_mlp_shape_range_and_layers():
    torch.manual_seed(0)
    policy = M.bc_mlp(11, 3, hidden=32, layers=2)
    act = policy(100 * torch.randn(64, 11))
    assert act.shape == (64, 3) and act.abs().max() <= 1
    assert [type(m).__name__ for m in policy] == ["Linear", "ReLU", "Linear", "ReLU", "Linear",
                                                   "Tanh"]
    assert M.count_parameters(M.bc_mlp(11, 3)) == 11 * 256 + 256 + 256 * 256 + 256 + 256 * 3 + 3


def test_fasttext_is_a_linear_head_on_mean_embeddings():
    torch.manual_seed(0)
    model = M.fasttext(vocab_size=20, num_classes=4, embed_dim=8, dropout=0.5).eval()
    assert M.count_parameters(model) == 20 * 8 + 8 * 4 + 4
    assert model.embed.weight.abs().max() <= 1 / 8 and model.embed.weight.std() > 1 / 32
    padded = torch.tensor([[2, 3, 4, 0], [5, 0, 0, 0]])
    head = model.mlp[-1]
    with torch.no_grad():
        mean = model.embed.weight[[2, 3, 4]].mean(0)
        torch.testing.assert_close(model(padded)[0], head(mean))
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        M.TextClassifier(20, 4, hidden=-1)
