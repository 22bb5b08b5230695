"""The diffusion fusion imputes: trained on (random subset -> full-set teacher z) pairs from
cached tokens, its samples from an informative subset land near the full-set z and predict the
label, while samples from an uninformative subset do not."""

import torch

from ClinFuseDiffCore.config import load_config
from ClinFuseDiffCore.models import build_model

MODS = ["mri_t1", "mri_flair", "clinical"]
DIMS = {"clinical": {"num": 2, "cat_cardinalities": []}}
E = 16
STEPS = 150


def synthetic_tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """T1 and FLAIR tokens carry the label (two fixed directions); clinical is pure noise."""
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float().unsqueeze(-1)  # (n, 1)
    d1 = torch.randn(E, generator=torch.Generator().manual_seed(11))
    d2 = torch.randn(E, generator=torch.Generator().manual_seed(12))
    tokens = torch.stack([
        sign * d1 + 0.3 * torch.randn(n, E, generator=g),
        sign * d2 + 0.3 * torch.randn(n, E, generator=g),
        torch.randn(n, E, generator=g),
    ], 1)  # (n, M, E)
    return tokens, y


def test_diffusion_samples_impute_from_an_informative_subset():
    torch.manual_seed(0)
    cfg = load_config(None, [
        "data.modalities=[mri_t1, mri_flair, clinical]", "model.embed_dim=16", "model.fusion=diffusion",
        "model.image_encoder=resnet10", "model.encoder_widths=[4,4,4,4]", "model.tabular_hidden=[8]",
        "model.dropout=0.0", "model.head_hidden=32", "diffusion.num_train_timesteps=100",
        "diffusion.num_inference_steps=10", "diffusion.denoiser_depth=2", "diffusion.denoiser_heads=4",
        "diffusion.teacher=stopgrad", "diffusion.cond_dropout=0.1",
    ])
    model = build_model(cfg, DIMS)
    params = [p for n, p in model.named_parameters() if not n.startswith("encoders.")]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    full = torch.ones(64, 3, dtype=torch.bool)
    for _ in range(STEPS):
        tokens, y = synthetic_tokens(64, g)
        cond = torch.rand(64, 3, generator=g) < 0.6  # a random subset as the condition
        cond[torch.arange(64), torch.randint(0, 3, (64,), generator=g)] = True  # at least one
        loss = model.compute_losses(tokens, cond, y, available_full=full,
                                    lambdas={"pred": 1.0, "diff": 1.0, "recon": 0.0, "contra": 0.0})
        opt.zero_grad()
        loss["total"].backward()
        opt.step()

    model.eval()
    tokens, y = synthetic_tokens(200, torch.Generator().manual_seed(99))
    with torch.no_grad():
        z_full = model.fusion.teacher(tokens, torch.ones(200, 3, dtype=torch.bool))  # (N, E)
        results = {}
        for name, mask in {"t1": [1, 0, 0], "clinical": [0, 0, 1]}.items():
            avail = torch.tensor(mask, dtype=torch.bool).expand(200, 3)
            z = model.fuse(tokens, avail, num_samples=4, generator=torch.Generator().manual_seed(0))  # (K, N, E)
            err = float(((z - z_full) ** 2).mean())
            acc = float((model.head(z).softmax(-1).mean(0).argmax(-1) == y).float().mean())
            results[name] = (err, acc)
    (err_t1, acc_t1), (err_cl, acc_cl) = results["t1"], results["clinical"]
    assert acc_t1 > 0.95, results  # FLAIR imputed from T1: the label survives
    assert acc_cl < 0.7, results  # noise alone says nothing about the label
    assert err_t1 < 0.5 * err_cl, results  # samples from T1 are near the full-set fusion
