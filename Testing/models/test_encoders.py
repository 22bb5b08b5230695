"""Encoders: shapes over parameter tables, each constructor argument changes what is built,
and encoders never see unavailable rows."""

import pytest
import torch
import torch.nn as nn

from ClinFuseDiffCore.models.encoders import ImageEncoder, ModalityEncoders, TabularEncoder


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "kwargs, in_shape, out_shape",
    [
        (dict(depth="resnet10", widths=[4, 4, 8, 8], first_stride=2), (2, 1, 16, 16, 16), (2, 8)),
        (dict(depth="resnet18", widths=[4, 8, 8, 16], first_stride=1), (1, 1, 16, 12, 16), (1, 16)),
        (dict(depth="resnet34", widths=[4, 4, 4, 4], first_stride=2), (2, 1, 16, 16, 16), (2, 4)),
        (dict(depth="resnet50", widths=[4, 4, 8, 8], first_stride=2), (2, 1, 16, 16, 16), (2, 32)),
    ],
)
def test_image_encoder_shapes(kwargs, in_shape, out_shape):
    enc = ImageEncoder(**kwargs).eval()
    assert enc(torch.randn(in_shape)).shape == out_shape
    assert enc.out_features == out_shape[1]


def test_image_encoder_arguments_change_the_network():
    base = dict(depth="resnet10", widths=[4, 4, 8, 8], first_stride=2, first_kernel=7)
    ref = ImageEncoder(**base)
    assert n_params(ImageEncoder(**{**base, "widths": [4, 8, 8, 16]})) > n_params(ref)
    assert n_params(ImageEncoder(**{**base, "depth": "resnet18"})) > n_params(ref)
    assert n_params(ImageEncoder(**{**base, "first_kernel": 3})) < n_params(ref)
    assert ImageEncoder(**{**base, "first_kernel": 3}).net.conv1.weight.shape[-1] == 3
    x = torch.randn(1, 1, 32, 32, 32)
    fm2 = ref.eval().feature_map(x)
    fm1 = ImageEncoder(**{**base, "first_stride": 1}).eval().feature_map(x)
    assert fm2.shape[2:] == (1, 1, 1) and fm1.shape[2:] == (2, 2, 2)


@pytest.mark.parametrize(
    "norm, norm_type", [("batch", nn.BatchNorm3d), ("group", nn.GroupNorm), ("instance", nn.InstanceNorm3d)]
)
def test_image_encoder_norm_is_really_used(norm, norm_type):
    """MONAI PR #9028 lesson: check the norm argument reaches every block."""
    enc = ImageEncoder("resnet18", [4, 8, 8, 16], 2, norm=norm)
    norms = [m for m in enc.modules() if isinstance(m, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d))]
    assert norms and all(isinstance(m, norm_type) for m in norms)


def test_group_norm_encodes_a_single_row_with_a_1_voxel_map():
    enc = ImageEncoder("resnet10", [4, 4, 8, 8], 2).train()
    assert enc(torch.randn(1, 1, 16, 16, 16)).shape == (1, 8)  # batch norm would raise here


def test_grad_checkpointing_recomputes_and_matches():
    torch.manual_seed(0)
    plain = ImageEncoder("resnet10", [4, 4, 8, 8], 2, norm="group").train()
    ckpt = ImageEncoder("resnet10", [4, 4, 8, 8], 2, norm="group", grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    plain.net.layer2.register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.net.layer2.register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x = torch.randn(2, 1, 16, 16, 16)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    assert calls == {"plain": 1, "ckpt": 2}  # recomputed in backward
    g1 = plain.net.layer1[0].conv1.weight.grad
    g2 = ckpt.net.layer1[0].conv1.weight.grad
    assert torch.allclose(g1, g2, atol=1e-5)


def test_image_encoder_bad_arguments():
    with pytest.raises(ValueError, match="resnet50"):
        ImageEncoder("resnet11")
    with pytest.raises(ValueError, match="4 positive"):
        ImageEncoder("resnet10", [4, 4, 8])
    with pytest.raises(ValueError, match="encoder_norm"):
        ImageEncoder("resnet10", [4, 4, 8, 8], norm="layer")


@pytest.mark.parametrize(
    "num, cards, hidden, out",
    [(3, [2, 4], [16, 8], 8), (0, [3], [5], 5), (4, [], [12, 12], 12)],
)
def test_tabular_encoder_shapes(num, cards, hidden, out):
    enc = TabularEncoder(num, cards, 4, hidden, 0.0)
    cat = torch.stack([torch.randint(0, c + 1, (6,)) for c in cards], 1) if cards else torch.zeros(6, 0, dtype=torch.long)
    y = enc(torch.randn(6, num), torch.zeros(6, num), cat)
    assert y.shape == (6, out) and enc.out_features == out


def test_tabular_encoder_uses_missing_indicators_and_categories():
    torch.manual_seed(0)
    enc = TabularEncoder(2, [3], 4, [8], 0.0).eval()
    num, cat = torch.zeros(1, 2), torch.tensor([[1]])
    a = enc(num, torch.zeros(1, 2), cat)
    b = enc(num, torch.ones(1, 2), cat)  # same zeros, now flagged missing
    c = enc(num, torch.zeros(1, 2), torch.tensor([[2]]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert len(enc.embeddings) == 1 and enc.embeddings[0].num_embeddings == 4  # 3 + "missing"
    assert n_params(TabularEncoder(2, [3, 5], 4, [8])) > n_params(TabularEncoder(2, [3], 4, [8]))


def test_tabular_encoder_rejects_bad_codes_and_widths():
    enc = TabularEncoder(1, [2], 4, [8])
    with pytest.raises(ValueError, match="allowed 0..2"):
        enc(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="built for 1 / 1"):
        enc(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="at least one column"):
        TabularEncoder(0, [], 4, [8])


MODS = ["mri_t1", "ct", "clinical"]
IMGS = ["mri_t1", "ct"]
DIMS = {"clinical": {"num": 3, "cat_cardinalities": [2]}}


def make_encoders(**kw) -> ModalityEncoders:
    args = dict(embed_dim=16, image_encoder="resnet10", encoder_widths=[4, 4, 8, 8], first_stride=2,
                tabular_hidden=[8], categorical_embed_dim=2, dropout=0.0)
    args.update(kw)
    return ModalityEncoders(MODS, IMGS, DIMS, **args)


def make_batch(B=4, fill=0.0):
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(B, 2, 1, 16, 16, 16, generator=g),
        "tabular": {"clinical": {"num": torch.randn(B, 3, generator=g), "num_missing": torch.zeros(B, 3),
                                 "cat": torch.randint(0, 3, (B, 1), generator=g)}},
        "available": torch.ones(B, 3, dtype=torch.bool),
    }


@pytest.mark.parametrize("shared", [False, True])
def test_absent_slots_are_never_encoded(shared):
    enc = make_encoders(shared_image_encoder=shared).eval()
    batch = make_batch()
    avail = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    for b, k in [(1, 0), (3, 0), (0, 1), (3, 1)]:
        batch["images"][b, k] = float("nan")  # absent image slots hold NaN
    batch["tabular"]["clinical"]["num"][1] = float("nan")
    seen = []
    for m in enc.modules():
        if isinstance(m, ImageEncoder):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    tokens = enc(batch, avail)
    assert tokens.shape == (4, 3, 16)
    assert torch.isfinite(tokens).all()
    assert torch.all(tokens[~avail] == 0)
    assert torch.all(tokens[avail].abs().sum(-1) > 0)
    assert seen == ([4] if shared else [2, 2])  # only the available (patient, image) pairs


def test_tokens_do_not_depend_on_other_rows_availability():
    enc = make_encoders().eval()
    batch = make_batch()
    full = enc(batch, torch.ones(4, 3, dtype=torch.bool))
    part = enc(batch, torch.tensor([[1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool))
    assert torch.allclose(full[0], part[0], atol=1e-5)
    assert torch.allclose(full[2, 0], part[2, 0], atol=1e-5)


def test_shared_encoder_has_fewer_parameters_and_keeps_modalities_apart():
    sep, shared = make_encoders(), make_encoders(shared_image_encoder=True).eval()
    assert n_params(shared) < n_params(sep)
    batch = make_batch()
    batch["images"][:, 1] = batch["images"][:, 0]  # the same image in both slots
    tok = shared(batch, torch.ones(4, 3, dtype=torch.bool))
    assert not torch.allclose(tok[:, 0], tok[:, 1])  # modality embeddings tell them apart


def test_embed_dim_and_widths_change_the_modules():
    assert make_encoders(embed_dim=32).modality_embedding.shape == (3, 32)
    assert n_params(make_encoders(encoder_widths=[8, 8, 16, 16])) > n_params(make_encoders())
    assert n_params(make_encoders(tabular_hidden=[32, 32])) > n_params(make_encoders())


def test_missing_tabular_dims_and_bad_batches_raise():
    with pytest.raises(ValueError, match="no tabular dims for \\['clinical'\\]"):
        ModalityEncoders(MODS, IMGS, {}, 16)
    enc = make_encoders()
    batch = make_batch()
    with pytest.raises(ValueError, match="available mask has 2 modalities"):
        enc(batch, torch.ones(4, 2, dtype=torch.bool))
    batch["images"] = batch["images"][:, :1]
    with pytest.raises(ValueError, match=r"\(B, 2, 1, D, H, W\)"):
        enc(batch, torch.ones(4, 3, dtype=torch.bool))
