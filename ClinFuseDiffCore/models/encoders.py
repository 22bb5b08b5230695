"""Per-modality encoders: 3D MONAI ResNets for images, an MLP for tabular data, and the module
that turns a batch into one token per modality.

Every encoder runs only on the rows where its modality is available: the rows are selected
(``index_select``), encoded, and scattered back into a zero ``(B, M, E)`` tensor. Absent slots are
never passed through a network, so whatever fills them (zeros, NaN) cannot leak into the tokens.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import resnet as monai_resnet
from torch.utils.checkpoint import checkpoint

_RESNET_DEPTHS = ("resnet10", "resnet18", "resnet34", "resnet50")
_NORMS = ("batch", "group", "instance")


def _group_count(widths: Sequence[int], expansion: int, max_groups: int = 8) -> int:
    """Largest group count <= max_groups that divides every stage's channel count."""
    g = math.gcd(*[int(w) for w in widths] + [int(w) * expansion for w in widths])
    return max(d for d in range(1, max_groups + 1) if g % d == 0)


class _MonaiResNet(monai_resnet.ResNet):
    """MONAI's ResNet with ``norm`` passed on to every residual block.

    In MONAI 1.6.1 ``ResNet.__init__`` calls ``_make_layer`` without ``norm=``, so the blocks
    (and their downsample shortcuts) silently keep batch norm whatever ``norm`` says; only the
    stem follows it (the MONAI PR #9028 kind of bug; ``test_image_encoder_norm_is_really_used``
    catches it). This subclass forwards the argument.
    """

    def __init__(self, *args: Any, norm: Any = "batch", **kwargs: Any) -> None:
        object.__setattr__(self, "_block_norm", norm)
        super().__init__(*args, norm=norm, **kwargs)

    def _make_layer(self, *args: Any, **kwargs: Any) -> nn.Sequential:
        kwargs["norm"] = self._block_norm
        return super()._make_layer(*args, **kwargs)


def tabular_dims_of(dims: Any) -> tuple[int, list[int]]:
    """(num, cat_cardinalities) from a ``TabularDims`` or a mapping with those keys."""
    if isinstance(dims, Mapping):
        return int(dims["num"]), [int(c) for c in dims["cat_cardinalities"]]
    return int(dims.num), [int(c) for c in dims.cat_cardinalities]


class ImageEncoder(nn.Module):
    """A 3D MONAI ResNet without its classifier: (N, 1, D, H, W) -> (N, F).

    Args:
        depth: one of ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``.
        widths: the four ``block_inplanes`` (channels of the four stages).
        first_stride: stride of the first convolution (2 quarters the cost on a CPU).
        first_kernel: kernel size of the first convolution.
        grad_checkpointing: recompute each stage in backward (saves activation memory on GPU).
        norm: ``"group"`` (default), ``"batch"`` or ``"instance"``. Group norm is the default
            because each modality's encoder sees a sub-batch of varying size (down to one row
            when a modality is rare in a batch, where batch norm fails on small feature maps)
            and single patients at inference/TTT, where batch-norm running statistics would
            differ from the training batches.

    ``out_features`` is ``widths[-1]`` (``4 * widths[-1]`` for the bottleneck ResNet-50).
    """

    def __init__(
        self,
        depth: str = "resnet10",
        widths: Sequence[int] = (64, 128, 256, 512),
        first_stride: int = 1,
        first_kernel: int = 7,
        grad_checkpointing: bool = False,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if depth not in _RESNET_DEPTHS:
            raise ValueError(f"image encoder {depth!r} not in {list(_RESNET_DEPTHS)}; set model.image_encoder")
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"model.encoder_widths must be 4 positive ints, got {list(widths)}")
        if first_stride < 1 or first_kernel < 1:
            raise ValueError(
                f"model.first_stride ({first_stride}) and model.first_kernel ({first_kernel}) must be >= 1"
            )
        if norm not in _NORMS:
            raise ValueError(f"encoder norm {norm!r} not in {list(_NORMS)}; set model.encoder_norm")
        # MONAI's own table for resnet10/18/34/50 (block, layers, shortcut, bias_downsample).
        # The resnetXX() factories fix block_inplanes, so the ResNet class is built directly;
        # no pretrained weights are involved (that path reaches for a hub and fails offline).
        block, layers, shortcut_type, bias_downsample, _ = monai_resnet.resnet_params[depth]
        expansion = 4 if block == "bottleneck" else 1
        norm_arg: Any = {
            "group": ("group", {"num_groups": _group_count(widths, expansion)}),
            "instance": ("instance", {"affine": True}),
            "batch": "batch",
        }[norm]
        self.net = _MonaiResNet(
            block=block,
            layers=list(layers),
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
            norm=norm_arg,
            spatial_dims=3,
            n_input_channels=1,
            block_inplanes=[int(w) for w in widths],
            conv1_t_stride=int(first_stride),
            conv1_t_size=int(first_kernel),
            feed_forward=False,
        )
        self.out_features = int(widths[-1]) * expansion
        self.grad_checkpointing = grad_checkpointing

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, (N, F, d, h, w)."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))  # (N, w0, D/s, H/s, W/s)
        if not net.no_max_pool:
            x = net.maxpool(x)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x  # (N, F, d, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, 1, D, H, W). Returns: (N, F) globally average-pooled features."""
        return self.net.avgpool(self.feature_map(x)).flatten(1)  # (N, F)


class TabularEncoder(nn.Module):
    """MLP over numeric values, their missing-value indicators and categorical embeddings.

    Args:
        num_numeric: F_num, numeric columns (0 allowed).
        cat_cardinalities: number of categories per categorical column; index 0 of every
            column is reserved for missing/unknown, so column j takes values 0..cardinality_j.
        cat_embed_dim: width of each categorical embedding.
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        num_numeric: int,
        cat_cardinalities: Sequence[int],
        cat_embed_dim: int = 8,
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_numeric < 0 or any(int(c) < 1 for c in cat_cardinalities):
            raise ValueError(
                f"tabular dims must be num >= 0 and cardinalities >= 1, got num={num_numeric}, "
                f"cat_cardinalities={list(cat_cardinalities)}"
            )
        if num_numeric == 0 and not cat_cardinalities:
            raise ValueError("a tabular modality needs at least one column; check data.tabular columns")
        if not hidden:
            raise ValueError("model.tabular_hidden must list at least one width")
        self.num_numeric = int(num_numeric)
        self.cat_cardinalities = [int(c) for c in cat_cardinalities]
        self.embeddings = nn.ModuleList(
            nn.Embedding(c + 1, cat_embed_dim) for c in self.cat_cardinalities
        )
        in_dim = 2 * self.num_numeric + cat_embed_dim * len(self.cat_cardinalities)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, int(h)), nn.LayerNorm(int(h)), nn.GELU(), nn.Dropout(dropout)]
            in_dim = int(h)
        self.mlp = nn.Sequential(*layers)
        self.out_features = in_dim

    def forward(
        self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor
    ) -> torch.Tensor:
        """Args: num (N, F_num), num_missing (N, F_num) 0/1, cat (N, F_cat) long.

        Returns: (N, hidden[-1]).
        """
        if num.shape[-1] != self.num_numeric or cat.shape[-1] != len(self.cat_cardinalities):
            raise ValueError(
                f"tabular input has {num.shape[-1]} numeric / {cat.shape[-1]} categorical columns; "
                f"the model was built for {self.num_numeric} / {len(self.cat_cardinalities)}"
            )
        parts = [num.float(), num_missing.float()]  # (N, F_num) each
        for j, emb in enumerate(self.embeddings):
            col = cat[:, j].long()
            if col.numel() and (int(col.min()) < 0 or int(col.max()) > self.cat_cardinalities[j]):
                raise ValueError(
                    f"categorical column {j} has codes [{int(col.min())}, {int(col.max())}]; "
                    f"allowed 0..{self.cat_cardinalities[j]} (0 = missing)"
                )
            parts.append(emb(col))  # (N, cat_embed_dim)
        return self.mlp(torch.cat(parts, dim=-1))  # (N, hidden[-1])


class ModalityEncoders(nn.Module):
    """Batch -> tokens (B, M, E): encoder, projection to E, plus a learned modality embedding.

    Args:
        modalities: all modality names in batch order (images and tabular, ``cfg.data.modalities``).
        image_modalities: the image names among them (their order is the order of ``batch["images"]``).
        tabular_dims: ``{name: TabularDims}`` for every tabular modality.
        embed_dim: E.
        image_encoder: ResNet depth name.
        encoder_widths, first_stride, first_kernel, grad_checkpointing, encoder_norm: see
            ``ImageEncoder``.
        shared_image_encoder: one ResNet (and one projection) for all image modalities; the
            modality embedding tells them apart. Otherwise one per modality.
        tabular_hidden, categorical_embed_dim, dropout: see ``TabularEncoder``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        image_modalities: Sequence[str],
        tabular_dims: Mapping[str, Any],
        embed_dim: int,
        image_encoder: str = "resnet10",
        encoder_widths: Sequence[int] = (64, 128, 256, 512),
        first_stride: int = 1,
        first_kernel: int = 7,
        shared_image_encoder: bool = False,
        tabular_hidden: Sequence[int] = (128, 128),
        categorical_embed_dim: int = 8,
        dropout: float = 0.1,
        grad_checkpointing: bool = False,
        encoder_norm: str = "group",
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.image_modalities = [m for m in self.modalities if m in set(image_modalities)]
        self.tabular_modalities = [m for m in self.modalities if m not in set(image_modalities)]
        self.embed_dim = int(embed_dim)
        self.shared_image_encoder = bool(shared_image_encoder)
        missing = [m for m in self.tabular_modalities if m not in tabular_dims]
        if missing:
            raise ValueError(
                f"no tabular dims for {missing}; tabular_dims has {sorted(tabular_dims)} "
                "(pass the TabularNormalizer's dims for every tabular modality)"
            )

        def make_image() -> ImageEncoder:
            return ImageEncoder(
                image_encoder, encoder_widths, first_stride, first_kernel, grad_checkpointing, encoder_norm
            )

        def make_proj(f: int) -> nn.Module:
            return nn.Sequential(nn.Linear(f, self.embed_dim), nn.LayerNorm(self.embed_dim))

        self.encoders = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        if self.image_modalities and self.shared_image_encoder:
            self.shared_image = make_image()
            self.shared_projection = make_proj(self.shared_image.out_features)
        else:
            self.shared_image = None
            self.shared_projection = None
            for m in self.image_modalities:
                self.encoders[m] = make_image()
                self.projections[m] = make_proj(self.encoders[m].out_features)
        for m in self.tabular_modalities:
            num, cards = tabular_dims_of(tabular_dims[m])
            self.encoders[m] = TabularEncoder(num, cards, categorical_embed_dim, tabular_hidden, dropout)
            self.projections[m] = make_proj(self.encoders[m].out_features)
        self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), self.embed_dim) * 0.02)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        for mod in self.modules():
            if isinstance(mod, ImageEncoder):
                mod.grad_checkpointing = enabled

    def _check_batch(self, batch: Mapping[str, Any], available: torch.Tensor) -> None:
        M = available.shape[1]
        if M != len(self.modalities):
            raise ValueError(
                f"available mask has {M} modalities, the model has {len(self.modalities)}: {self.modalities}"
            )
        if self.image_modalities:
            imgs = batch.get("images")
            if imgs is None or imgs.dim() != 6 or imgs.shape[1] != len(self.image_modalities):
                shape = None if imgs is None else tuple(imgs.shape)
                raise ValueError(
                    f"batch['images'] must be (B, {len(self.image_modalities)}, 1, D, H, W) for "
                    f"{self.image_modalities}; got {shape}"
                )
        for m in self.tabular_modalities:
            if m not in batch.get("tabular", {}):
                raise ValueError(f"batch['tabular'] lacks {m!r}; it has {sorted(batch.get('tabular', {}))}")

    def forward(self, batch: Mapping[str, Any], available: torch.Tensor) -> torch.Tensor:
        """Encode the available entries of a batch.

        Args:
            batch: the batch dict of docs/ARCHITECTURE.md (``images`` (B, M_img, 1, D, H, W),
                ``tabular`` {name: {num, num_missing, cat}}).
            available: (B, M) bool, the entries to encode.

        Returns:
            tokens (B, M, E); rows of absent entries are exactly 0 (no modality embedding).
        """
        self._check_batch(batch, available)
        available = available.bool()
        B = available.shape[0]
        device = self.modality_embedding.device
        dtype = self.modality_embedding.dtype
        cols: list[Optional[torch.Tensor]] = [None] * len(self.modalities)

        # Images. Shared encoder: one pass over all available (patient, modality) pairs.
        if self.image_modalities:
            images = batch["images"]
            img_cols = [self.modalities.index(m) for m in self.image_modalities]
            if self.shared_image is not None:
                avail_img = available[:, img_cols].to(images.device)  # (B, M_img)
                b_idx, k_idx = avail_img.nonzero(as_tuple=True)  # (N,), (N,)
                if b_idx.numel():
                    x = images[b_idx, k_idx].to(device, dtype)  # (N, 1, D, H, W)
                    feats = self.shared_projection(self.shared_image(x))  # (N, E)
                    for k, col in enumerate(img_cols):
                        sel = k_idx == k
                        cols[col] = self._scatter(feats[sel], b_idx[sel].to(device), B)
            else:
                for k, (m, col) in enumerate(zip(self.image_modalities, img_cols)):
                    rows = available[:, col].nonzero(as_tuple=True)[0]  # (N,)
                    if rows.numel() == 0:
                        continue
                    x = images.index_select(0, rows.to(images.device))[:, k].to(device, dtype)  # (N, 1, D, H, W)
                    feats = self.projections[m](self.encoders[m](x))  # (N, E)
                    cols[col] = self._scatter(feats, rows.to(device), B)

        for m in self.tabular_modalities:
            col = self.modalities.index(m)
            rows = available[:, col].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            tab = batch["tabular"][m]
            r = rows.to(tab["num"].device)
            feats = self.encoders[m](
                tab["num"].index_select(0, r).to(device, dtype),
                tab["num_missing"].index_select(0, r).to(device, dtype),
                tab["cat"].index_select(0, r).to(device),
            )  # (N, hidden)
            cols[col] = self._scatter(self.projections[m](feats), rows.to(device), B)

        zeros = torch.zeros(B, self.embed_dim, device=device, dtype=dtype)
        tokens = torch.stack([c if c is not None else zeros for c in cols], dim=1)  # (B, M, E)
        mask = available.to(device).unsqueeze(-1).to(dtype)  # (B, M, 1)
        return tokens + self.modality_embedding.unsqueeze(0) * mask  # (B, M, E)

    @staticmethod
    def _scatter(values: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Place (N, E) values at ``rows`` of a zero (B, E) tensor (differentiable)."""
        out = values.new_zeros(batch_size, values.shape[-1])
        return out.index_copy(0, rows, values)  # (B, E)
