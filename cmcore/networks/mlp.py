"""Small MLP backbone F_theta(x, c_noise) for low-dimensional (2-D) data."""

import torch.nn.functional as F
from torch import nn

from .layers import PositionalEmbedding


class MLP(nn.Module):
    """Residual MLP F_theta(x, c_noise): x (B, in_channels), noise_labels (B,) -> (B, in_channels).

    emb = silu(W_e pos(c_noise) (+ W_y y));  h_0 = W_in x + emb;
    h_{i+1} = h_i + W_i silu(LayerNorm(h_i)), i < depth;  out = W_out silu(h_depth).
    The output layer starts at zero so that F_theta = 0 at initialisation.

    Args:
        in_channels: data dimension (2 for 2-D point clouds); also the output dimension.
        hidden: width of every hidden layer and of the noise embedding.
        depth: number of hidden (residual) layers.
        label_dim: number of classes for conditioning (0 = unconditional).
    """

    def __init__(self, in_channels=2, hidden=128, depth=3, label_dim=0):
        super().__init__()
        self.in_channels = in_channels
        self.label_dim = label_dim
        self.map_noise = PositionalEmbedding(hidden, endpoint=True)
        self.map_layer = nn.Linear(hidden, hidden)
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(in_channels, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, in_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """x (B, in_channels), noise_labels (B,) -> (B, in_channels); augment_labels unused."""
        # Noise (and class) embedding.
        emb = self.map_layer(self.map_noise(noise_labels.to(x.dtype)))
        if self.map_label is not None:
            if class_labels is None:  # no label given: the all-zero (unconditional) label
                class_labels = x.new_zeros(x.shape[0], self.label_dim)
            emb = emb + self.map_label(class_labels.to(x.dtype))
        h = self.inp(x) + F.silu(emb)

        # Pre-norm residual layers.
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(F.silu(norm(h)))
        return self.out(F.silu(h))
