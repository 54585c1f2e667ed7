"""Small models for the experiments: a small CNN, a CIFAR-style ResNet-8, text classifiers and the BC policy.

All are plain ``nn.Module``s; seed with ``torch.manual_seed`` before building them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (He et al. 2016, option B shortcut).

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity,
    or a strided 1×1 conv + BN when the width or resolution changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3×3 stem, stages of BasicBlocks (stride 2 after the first), pooling.

    Args:
        num_classes: Output logits.
        in_channels: Input image channels (1 for Fashion-MNIST, 3 for CIFAR).
        widths: Channels of each stage.
        blocks_per_stage: BasicBlocks per stage (1 gives ResNet-8, 3 gives ResNet-20).
    """

    def __init__(self, num_classes: int, in_channels: int = 3,
                 widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, width = [], widths[0]
        for stage, out in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(width, out, 2 if stage > 0 and b == 0 else 1))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet8(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-8: 3 stages of one BasicBlock each, widths 16/32/64, BatchNorm (~78k parameters)."""
    return ResNet(num_classes, in_channels, (16, 32, 64), blocks_per_stage=1)


def small_cnn(num_classes: int, in_channels: int = 1, widths: tuple[int, int] = (16, 32),
              hidden: int = 128, size: int = 28) -> nn.Sequential:
    """Two 3×3 conv-ReLU-maxpool stages and a one-hidden-layer head, no BatchNorm.

    For 28×28 Fashion-MNIST with the defaults: 16 and 32 channels, a 128-unit hidden layer, about
    207k parameters; 10 epochs of SGD with cosine decay reach about 92% test accuracy. Without
    BatchNorm an average of its weights needs no refreshed statistics.

    Args:
        num_classes: Output logits.
        in_channels: Input image channels.
        widths: Channels of the two conv stages.
        hidden: Units of the hidden layer.
        size: Input height and width (divisible by 4).
    """
    if size % 4:
        raise ValueError(f"small_cnn pools twice by 2: the input size must be divisible by 4, got {size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(widths[1] * (size // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class TextClassifier(nn.Module):
    """Mean of term embeddings (``nn.EmbeddingBag``) followed by a one-hidden-layer MLP.

    Accepts either padded ids ``B×L`` (padding id excluded from the mean) or the flat ids plus
    ``offsets`` from ``Vocab.encode_bag``. With ``hidden=0`` the head is a single linear layer:
    ``logits = W · dropout(mean_t E[x_t]) + b``, the fastText classifier (see :func:`fasttext`).

    Args:
        vocab_size: Rows of the embedding table.
        num_classes: Output logits.
        embed_dim: Embedding width.
        hidden: MLP hidden width (0: a linear head).
        dropout: Dropout on the pooled embedding.
        padding_idx: Id ignored in the mean.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 64, hidden: int = 64,
                 dropout: float = 0.0, padding_idx: int = 0) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean", padding_idx=padding_idx)
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: a linear head), got {hidden}")
        head: list[nn.Module] = [nn.Linear(embed_dim, num_classes)] if hidden == 0 else [
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.mlp = nn.Sequential(nn.Dropout(dropout), *head)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``B×num_classes``."""
        return self.mlp(self.embed(tokens, offsets))


def fasttext(vocab_size: int, num_classes: int, embed_dim: int = 64,
             dropout: float = 0.5) -> TextClassifier:
    """fastText-style classifier (Joulin et al. 2017): mean of term embeddings, dropout, linear.

    Pair it with an n-gram :class:`~sewa.experiments.data.Vocab` (``ngram=2``) for the bag of
    bigrams. It is a :class:`TextClassifier` with ``hidden=0`` whose embeddings start, as in
    fastText, uniform in ``[-1/embed_dim, 1/embed_dim]``: small, so that a rare term's random
    start adds little noise to the mean (torch's N(0, 1) start costs ~1 point on AG News).
    """
    model = TextClassifier(vocab_size, num_classes, embed_dim, hidden=0, dropout=dropout)
    nn.init.uniform_(model.embed.weight, -1.0 / embed_dim, 1.0 / embed_dim)
    return model


class TinyTransformer(nn.Module):
    """Small pre-norm Transformer encoder over padded ids, masked mean pooling, linear head.

    Args:
        vocab_size: Rows of the embedding table.
        num_classes: Output logits.
        d_model: Model width.
        nhead: Attention heads.
        layers: Encoder layers.
        dim_feedforward: Feed-forward width.
        max_len: Longest input (learned position embeddings).
        dropout: Dropout inside the encoder.
        padding_idx: Id treated as padding (masked from attention and pooling).
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 64, nhead: int = 4,
                 layers: int = 2, dim_feedforward: int = 128, max_len: int = 128,
                 dropout: float = 0.1, padding_idx: int = 0) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``B×num_classes`` for padded ids ``B×L`` (L <= max_len)."""
        if tokens.shape[1] > self.pos.shape[0]:
            raise ValueError(f"input length {tokens.shape[1]} exceeds max_len {self.pos.shape[0]}")
        pad = tokens.eq(self.padding_idx)
        pad[:, 0] = False  # an all-padding row would make attention NaN; let it see one token
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def bc_mlp(obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2) -> nn.Sequential:
    """Behaviour-cloning policy: ``layers`` Linear+ReLU of width ``hidden``, then Linear+tanh.

    Actions come out in [-1, 1], the MuJoCo/D4RL action range.
    """
    mods: list[nn.Module] = []
    width = obs_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, act_dim), nn.Tanh())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
