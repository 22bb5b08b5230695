"""ClinFuseDiffModel: build from config, output shapes per task, loss dict, and a tiny model that
overfits a small batch with each fusion method (16^3 images + a tabular modality)."""

import pytest
import torch
import torch.nn as nn

from ClinFuseDiffCore.config import load_config
from ClinFuseDiffCore.models import build_model
from ClinFuseDiffCore.models.fusion import AttentionFusion, DiffusionFusion, MeanFusion

MODS = ["mri_t1", "mri_flair", "clinical"]
DIMS = {"clinical": {"num": 3, "cat_cardinalities": [2]}}


def tiny_cfg(*overrides: str):
    base = [
        f"data.modalities={MODS}".replace("'", ""),
        "model.image_encoder=resnet10", "model.encoder_widths=[4,4,8,8]", "model.first_stride=2",
        "model.embed_dim=32", "model.tabular_hidden=[16]", "model.head_hidden=32", "model.dropout=0.0",
        "model.attention_heads=4", "diffusion.num_train_timesteps=50", "diffusion.num_inference_steps=5",
        "diffusion.denoiser_depth=2", "diffusion.denoiser_heads=4",
    ]
    return load_config(None, base + list(overrides))


def make_batch(B=8, seed=0, num_classes=2):
    g = torch.Generator().manual_seed(seed)
    avail = torch.ones(B, 3, dtype=torch.bool)
    avail[1, 0] = avail[2, 2] = avail[3, 1] = False
    return {
        # noise plus a per-(patient, modality) offset, so that pooled image features differ
        "images": torch.randn(B, 2, 1, 16, 16, 16, generator=g) + torch.randn(B, 2, 1, 1, 1, 1, generator=g),
        "tabular": {"clinical": {"num": torch.randn(B, 3, generator=g), "num_missing": torch.zeros(B, 3),
                                 "cat": torch.randint(0, 3, (B, 1), generator=g)}},
        "available": avail,
        "available_full": torch.ones(B, 3, dtype=torch.bool),
        "target": torch.arange(B) % num_classes,
        "time": torch.arange(1, B + 1, dtype=torch.float32),
        "event": (torch.arange(B) % 3 != 0).float(),
        "patient_id": [f"p{i}" for i in range(B)],
    }


@pytest.mark.parametrize(
    "overrides, kwargs, expected",
    [
        (["model.fusion=mean"], {}, (8, 2)),
        (["model.fusion=attention", "data.num_classes=3"], {}, (8, 3)),
        (["model.fusion=attention", "data.task=regression"], {}, (8, 1)),
        (["model.fusion=mean", "data.task=survival"], {"num_samples": 3}, (3, 8, 1)),
        (["model.fusion=diffusion"], {}, (8, 2)),
        (["model.fusion=diffusion"], {"num_samples": 4}, (4, 8, 2)),
        (["model.fusion=diffusion", "model.shared_image_encoder=true"], {"num_samples": 2}, (2, 8, 2)),
    ],
)
def test_forward_shapes(overrides, kwargs, expected):
    model = build_model(tiny_cfg(*overrides), DIMS).eval()
    with torch.no_grad():
        out = model(make_batch(), **kwargs)
    assert out.shape == expected and torch.isfinite(out).all()


def test_fusion_type_builds_its_module_and_scheduler():
    kinds = {"mean": MeanFusion, "attention": AttentionFusion, "diffusion": DiffusionFusion}
    for name, cls in kinds.items():
        model = build_model(tiny_cfg(f"model.fusion={name}"), DIMS)
        assert isinstance(model.fusion, cls) and model.fusion_type == name
        assert (model.scheduler is not None) == (name == "diffusion")
    assert build_model(tiny_cfg("model.fusion=diffusion", "diffusion.teacher=stopgrad"), DIMS).fusion.teacher_ema is None


def test_config_arguments_reach_the_model():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ref = build_model(tiny_cfg(), DIMS)
    assert n(build_model(tiny_cfg("model.shared_image_encoder=true"), DIMS)) < n(ref)
    assert n(build_model(tiny_cfg("model.encoder_widths=[8,8,16,16]"), DIMS)) > n(ref)
    assert n(build_model(tiny_cfg("diffusion.denoiser_depth=3"), DIMS)) > n(ref)
    assert build_model(tiny_cfg("model.embed_dim=16", "diffusion.denoiser_heads=2"), DIMS).embed_dim == 16
    ck = build_model(tiny_cfg("training.grad_checkpointing=true"), DIMS)
    assert all(e.grad_checkpointing for e in ck.encoders.encoders.values() if hasattr(e, "grad_checkpointing"))
    assert ref.fusion.scheduler.num_train_timesteps == 50
    gn = build_model(tiny_cfg("model.encoder_norm=batch"), DIMS)
    assert any(isinstance(m, nn.BatchNorm3d) for m in gn.modules())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in ref.modules())


def test_build_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="no tabular dims for \\['clinical'\\]"):
        build_model(tiny_cfg(), {})
    model = build_model(tiny_cfg("model.fusion=mean"), DIMS)
    with pytest.raises(ValueError, match=r"available must be \(B, 3\)"):
        model.fuse(torch.zeros(2, 3, 32), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        model.fuse(torch.zeros(2, 3, 32), torch.ones(2, 3, dtype=torch.bool), num_samples=0)
    with pytest.raises(ValueError, match="available mask is required"):
        model.compute_losses(torch.zeros(2, 3, 32))


@pytest.mark.parametrize("fusion", ["mean", "attention", "diffusion"])
@pytest.mark.parametrize("task", ["classification", "regression", "survival"])
def test_compute_losses_from_batch_and_tokens(fusion, task):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(f"model.fusion={fusion}", f"data.task={task}"), DIMS)
    batch = make_batch()
    if task == "regression":
        batch["target"] = torch.randn(8)
    out = model.compute_losses(batch)
    assert set(out) == {"total", "pred", "diff", "recon", "contra"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    lam = model.lambdas
    expected = sum(lam[k] * out[k] for k in ("pred", "diff", "recon", "contra"))
    assert torch.allclose(out["total"], expected)
    assert (out["diff"].item() > 0) == (fusion == "diffusion")
    out["total"].backward()
    grad = model.head.net[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0

    # from cached tokens, no target (TTT): pred is 0, a held-out modality is reconstructed
    model.zero_grad()
    tokens = model.encode(batch).detach()
    held_out = batch["available_full"].clone()
    held_out[:, 0] = False
    tok = model.compute_losses(tokens, held_out, available_full=batch["available_full"])
    assert float(tok["pred"]) == 0.0 and float(tok["recon"]) > 0
    tok["total"].backward()


def test_encode_defaults_to_available_full_and_forward_to_available():
    model = build_model(tiny_cfg("model.fusion=mean"), DIMS).eval()
    batch = make_batch()
    tokens = model.encode(batch)
    assert torch.all(tokens.abs().sum(-1) > 0)  # every really present entry encoded
    seen = []
    model.encoders.encoders["mri_t1"].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    model(batch)
    assert seen == [7]  # forward encodes only batch["available"] rows (one T1 dropped)


def test_lambdas_override():
    model = build_model(tiny_cfg("model.fusion=diffusion"), DIMS)
    out = model.compute_losses(make_batch(), lambdas={"diff": 1.0}, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["total"], out["diff"])


def _overfit(fusion: str, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    cfg = tiny_cfg(f"model.fusion={fusion}", "diffusion.cond_dropout=0.0", "diffusion.teacher=stopgrad")
    model = build_model(cfg, DIMS)
    batch = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = model.compute_losses(batch, lambdas={"pred": 1.0, "diff": 1.0, "recon": 0.0, "contra": 0.0})
        loss["total"].backward()
        opt.step()
        model.update_ema()
    model.eval()
    with torch.no_grad():
        # prediction through fuse(): diffusion samples z with DDIM from the condition
        logits = model(batch, num_samples=4, generator=torch.Generator().manual_seed(0)).mean(0) \
            if fusion == "diffusion" else model(batch)
    acc = float((logits.argmax(-1) == batch["target"]).float().mean())
    ce = float(nn.functional.cross_entropy(logits, batch["target"]))
    return acc, ce


@pytest.mark.parametrize("fusion, steps", [("mean", 60), ("attention", 60), ("diffusion", 150)])
def test_tiny_model_overfits_a_small_batch(fusion, steps):
    acc, ce = _overfit(fusion, steps)
    assert acc == 1.0, f"{fusion}: accuracy {acc}, CE {ce}"
    assert ce < 0.3
