"""Training on CPU: each stage's loss goes down, and `python -m pab.train` writes a checkpoint that the
pipeline loads strictly, and resumes where it stopped."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pab.data.shapes import render, sample_scenes
from pab.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
from pab.models.stdit3 import build_stdit3
from pab.train.loop import EMA
from pab.train.opensora import build_text_parts, flow_loss, vae_loss


def _clips(n=2, frames=5, size=32):
    return render(sample_scenes(n, torch.Generator().manual_seed(0)), frames, size, size, seed=0)


def test_vae_loss_goes_down():
    torch.manual_seed(0)
    vae = OpenSoraVAE(OpenSoraVAEConfig.from_size("small")).train()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    video = _clips()
    losses = []
    for _ in range(8):
        loss = vae_loss(vae, video)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_dit_and_text_encoder_loss_goes_down():
    torch.manual_seed(0)
    dit = build_stdit3("small").train()
    t5, tokenizer = build_text_parts()
    t5.train()
    tok = tokenizer(["a red circle moving left slowly on a black background", "a blue square growing on a white "
                     "background"], max_length=32, padding="max_length", return_tensors="pt")  # fmt: skip
    z = torch.randn(2, 4, 2, 8, 8)  # (B, C, t, h, w) latents
    opt = torch.optim.Adam([*dit.parameters(), *t5.parameters()], lr=1e-3)
    losses = []
    for i in range(12):
        y = t5(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        loss = flow_loss(dit, z, y, tok["attention_mask"], torch.Generator().manual_seed(i % 2), 8, (17, 32, 32), 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-2:]) < 0.6 * sum(losses[:2]), losses
    # the T5 learned too: its weights moved
    assert not torch.equal(t5.shared.weight, build_text_parts()[0].shared.weight)


def test_ema_averages_tied_weights_under_every_name():
    t5, _ = build_text_parts()
    ema = EMA(t5, decay=0.5)
    with torch.no_grad():
        t5.shared.weight.add_(1.0)
    ema.update(t5, step=10**6)
    ema.copy_to(t5)
    fresh = build_text_parts()[0].shared.weight
    assert torch.allclose(t5.encoder.embed_tokens.weight, fresh + 0.5, atol=1e-5)


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pab.train", "--device", "cpu", "--work", str(work), "--out", str(out),
           "--vae-steps", "1", "--vae-batch", "1", "--vae-eval-clips", "4", "--dit-steps", "2", "--batch", "2",
           "--log-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[dit] step 2/2  loss" in run.stdout and "steps/s" in run.stdout and "clips/s" in run.stdout
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert (out / part).is_dir(), part
    info = json.loads((out / "training.json").read_text())
    assert info["stages"]["dit"]["steps"] == 2 and "synthetic" in info["data"]
    # resume: the DiT stage continues from step 2 up to 3, it does not start over
    run = subprocess.run([*cmd[:-8], "--stage", "dit", "--resume", "--dit-steps", "3", "--batch", "2",
                          "--log-every", "1"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[dit] step 3/3" in run.stdout and "[dit] step 1/" not in run.stdout, run.stdout
    # the same command again without --resume would start over on top of that state: refused, state kept
    state = (work / "dit.pt").read_bytes()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "holds the state of an earlier run (vae.pt, dit.pt); pass --resume" in run.stderr
    assert (work / "dit.pt").read_bytes() == state
    # continue from exported weights alone (another session, another machine): starts there, not from scratch
    before = load_file(str(out / "transformer" / "model.safetensors"))
    run = subprocess.run([*cmd[:5], "--work", str(tmp_path / "work2"), "--out", str(tmp_path / "ckpt2"),
                          "--stage", "dit", "--dit-init", str(out), "--dit-steps", "1", "--batch", "1", "--lr", "1e-9", "--ema", "0",
                          "--seed", "1", "--resume"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and "starting from the weights" in run.stdout, run.stderr[-3000:]
    assert "nothing to resume in" in run.stderr  # --resume of a new --work says it starts at step 0
    after = load_file(str(tmp_path / "ckpt2" / "transformer" / "model.safetensors"))
    assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-2) for k in before)  # lr ~0: unchanged
    chain = json.loads((tmp_path / "ckpt2" / "training.json").read_text())["stages"]
    assert chain["vae"] == json.loads((out / "training.json").read_text())["stages"]["vae"]  # the VAE's record came along
    assert chain["dit"]["steps"] == 1 and chain["dit"]["init"]["dit"]["steps"] == 3  # and the run it continued
    from pab.pipeline import GenerationRequest, Pipeline

    pipe = Pipeline.from_name("opensora-v1.2-small", checkpoint=out, device="cpu")  # the strict loader
    r = pipe.generate(GenerationRequest(model="opensora-v1.2-small", prompt="a red circle staying still on a "
                                        "black background", steps=2, seed=0))  # fmt: skip
    assert r.frames.shape == (17, 64, 64, 3) and not r.random_weights


# ---------------------------------------------------------------------------- Latte-1 and Open-Sora-Plan recipes

RECIPE_NAMES = ["latte-1-small", "opensora-plan-v1.1-small"]


def _video(name, n=2, size=32):
    frames = 16 if name.startswith("latte") else 5  # the CausalVAE takes 4k + 1 frames
    return render(sample_scenes(n, torch.Generator().manual_seed(0)), frames, size, size, seed=0)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_vae_loss_goes_down(name):
    from pab.train import get_recipe

    recipe = get_recipe(name)
    torch.manual_seed(0)
    vae = recipe.new_vae().train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    video = _video(name)
    losses = []
    for _ in range(10):
        loss = recipe.vae_loss(vae, video)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_calibration_gives_unit_variance_latents_that_decode_the_same(name):
    """After calibration the DiT sees per-channel unit-variance latents, and decode() undoes the normalisation."""
    from pab.train import get_recipe
    from pab.train.common import clip_batch

    recipe = get_recipe(name)
    torch.manual_seed(0)
    vae = recipe.new_vae().eval()
    stats = recipe.calibrate(vae, torch.device("cpu"), clips=16, seed=3)
    assert len(stats["latents_mean"]) == len(stats["latents_std"]) == 4
    video, _ = clip_batch(name, 16, 3, 0, torch.device("cpu"))  # the very clips calibration saw
    z = vae.encode(video)
    per_channel = z.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(4), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(4), atol=1e-3)
    frames = video.shape[2]
    with torch.no_grad():
        if name.startswith("latte"):
            raw = vae.vae.decode(vae.vae.encode(video[:2].transpose(1, 2).flatten(0, 1)).latent_dist.mode()).sample
            raw = raw.unflatten(0, (2, frames)).transpose(1, 2)
        else:
            raw = vae.decode_latents(vae.encode_moments(video[:2]).chunk(2, dim=1)[0])
    torch.testing.assert_close(vae.decode(vae.encode(video[:2]), frames), raw, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_dit_and_text_encoder_loss_goes_down(name):
    """DDPM noise prediction through the family's own forward (the pipeline's call), T5 trained with it."""
    from pab.models import get_spec
    from pab.train import get_recipe
    from pab.train.stages import build_text_parts

    recipe = get_recipe(name)
    torch.manual_seed(0)
    dit = get_spec(name).transformer.build("small").train()
    t5, tokenizer = build_text_parts(name)
    t5.train()
    tok = tokenizer(["a red circle moving left slowly on a black background", "a blue square growing on a white "
                     "background"], max_length=32, padding="max_length", return_tensors="pt")  # fmt: skip
    z = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, t, h, w) latents
    opt = torch.optim.Adam([*dit.parameters(), *t5.parameters()], lr=1e-3)
    losses = []
    for i in range(20):
        y = t5(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        loss = recipe.dit_loss(dit, z, y, tok["attention_mask"], torch.Generator().manual_seed(i % 2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-2:]) < 0.6 * sum(losses[:2]), losses
    null = recipe.null_text(dit, t5, tokenizer, 32, torch.device("cpu"))
    assert null.shape == (32, 128)  # T5("") at full length: what a dropped caption becomes


def test_min_snr_weights_count_the_nearly_clean_steps_less():
    from pab.train.diffusion import alphas_cumprod

    a = alphas_cumprod()
    snr = a / (1 - a)
    w = snr.clamp(max=5.0) / snr
    assert w[0] < 0.01 and w[999] == 1.0 and bool((w[1:] >= w[:-1]).all())  # rises with the noise, then flat


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_train_command_trains_latte_and_opensora_plan_into_a_loadable_checkpoint(tmp_path, name):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pab.train", "--model", name, "--device", "cpu", "--work", str(tmp_path / "w"),
           "--out", str(out), "--vae-steps", "1", "--vae-batch", "1", "--vae-eval-clips", "4", "--dit-steps", "2", "--batch", "2",
           "--log-every", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[vae] step 1/1" in run.stdout and "[dit] step 2/2  loss" in run.stdout and "round-trip PSNR" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == name and any(f.startswith("vae/") for f in manifest["files"])
    from pab.pipeline import GenerationRequest, Pipeline

    pipe = Pipeline.from_name(name, checkpoint=out, device="cpu")  # the strict loaders of the published files
    r = pipe.generate(GenerationRequest(model=name, prompt="a red circle staying still on a black background",
                                        steps=4, seed=0, pab="paper"))  # fmt: skip
    d = pipe.spec.defaults_for("small")
    assert r.frames.shape == (d.num_frames, 64, 64, 3) and not r.random_weights


def test_unknown_model_has_no_recipe():
    from pab.train import get_recipe

    with pytest.raises(ValueError, match="available: opensora-v1.2-small, latte-1-small"):
        get_recipe("latte-1")
