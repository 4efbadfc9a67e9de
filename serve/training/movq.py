"""The MOVQ autoencoder: ``VQModel`` with spatial normalisation, as Kandinsky 2.2's decoder uses it.

The pipelines decode with ``movq.decode(latents, force_not_quantize=True)`` and
img2img encodes with ``movq.encode(image)["latents"]``, so the path that matters
is encode -> decode *without* quantisation: that is what the reconstruction loss
trains (with a little noise on the latents, so that the decoder tolerates the
U-Net's imperfect samples). The codebook is trained alongside with the usual VQ
loss so that ``decode(h)`` with quantisation also works. A light penalty keeps
each latent channel near zero mean and unit variance while training. Kandinsky's
pipelines apply no latent scaling factor, so the scale the U-Net sees is the MOVQ's
own: :func:`scale_latents` reparametrises a trained MOVQ to larger latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.training.common import LossLog, batches, optimiser_step, optimizer_and_schedule
from serve.training.data import to_model_range

LATENT_CHANNELS = 4
LATENT_NOISE = 0.1
SCALE_PENALTY = 0.1
VQ_WEIGHT = 0.1


def build_movq(seed: int, channels: tuple[int, ...] = (32, 32, 64, 64), codebook: int = 256, attention: bool = False):
    """Four levels: a scale factor of 8, as in the real MOVQ (64 px -> 8 latent px). ``attention``:
    attention at the lowest level, as in the real MOVQ (the recipe leaves it out: cheaper on a 2-core CPU)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D" if attention else "DownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D" if attention else "UpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=attention,
        block_out_channels=channels,  # SpatialNorm needs multiples of 32
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=codebook,
        vq_embed_dim=LATENT_CHANNELS,
    )


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE, plus ``edge_weight`` × L1 of the horizontal and vertical pixel differences:
    edges are a few pixels of each scene, and without that term they come out soft
    (rounded corners, blunt triangle tips)."""
    loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    if edge_weight:
        loss = loss + edge_weight * (
            F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2))
        )
    return loss


def movq_loss(movq, images: torch.Tensor, generator: torch.Generator, edge_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    x = to_model_range(images)
    h = movq.encode(x).latents
    noisy = h + LATENT_NOISE * torch.randn(h.shape, generator=generator).to(h.device)
    recon = movq.decode(noisy, force_not_quantize=True).sample
    rec = reconstruction_loss(recon, x, edge_weight)
    _, vq_loss, _ = movq.quantize(h)
    mean = h.mean(dim=(0, 2, 3))
    var = h.var(dim=(0, 2, 3))
    scale = (mean.pow(2) + (var - 1).pow(2)).mean()
    loss = rec + VQ_WEIGHT * vq_loss + SCALE_PENALTY * scale
    return loss, {"loss": loss.item(), "rec": rec.item(), "latent_std": var.mean().sqrt().item()}


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One ``size``×``size`` crop per image at a multiple of the latent stride (8 px)."""
    if size >= images.shape[-1]:
        return images
    stride = 8
    positions = (images.shape[-1] - size) // stride + 1
    offsets = torch.randint(0, positions, (len(images), 2), generator=generator) * stride
    return torch.stack([image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, offsets.tolist())])


def train_movq(
    movq, images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log_path=None,
    progress: bool = True, crop: int = 64, schedule_steps: int | None = None, device: str = "cpu", edge_weight: float = 0.0,
) -> dict[str, float]:
    """Reconstruction training. ``crop`` < 64 trains on random crops (cheaper; the network is
    fully convolutional), but the encoder's GroupNorm then sees other statistics than on whole
    images, which shifts colours: the recipe trains on whole images. ``schedule_steps`` (default
    ``steps``) is the learning-rate schedule's length: running fewer steps than the schedule
    gives exactly the weights a longer run has after ``steps`` steps."""
    movq.to(device).train()
    optimizer, schedule = optimizer_and_schedule(movq.parameters(), lr, schedule_steps or steps)
    generator = torch.Generator().manual_seed(seed)
    index_batches = batches(len(images), batch_size, generator)
    log = LossLog("movq", steps, log_path, progress=progress)
    for step in range(steps):
        loss, values = movq_loss(movq, random_crops(images[next(index_batches)], crop, generator).to(device), generator, edge_weight)
        optimiser_step(loss, optimizer, schedule, movq.parameters())
        log.step(step, **values)
    movq.eval()
    return log.close()


@torch.no_grad()
def scale_latents(movq, factor: float) -> None:
    """Reparametrise ``movq`` in place so that ``encode`` gives ``factor`` × its latents and
    ``decode`` takes them: the same images either way, exactly. The decoder reads its latents
    in three kinds of place, all 1×1 convolutions or the codebook: ``post_quant_conv`` and every
    spatial norm's ``conv_y``/``conv_b`` (weights ÷ ``factor``), and the codebook (× ``factor``).

    Larger latents are less noise at every diffusion timestep (a signal-to-noise shift): a
    detail whose latents differ by little (a small circle against a small square) is then
    settled at an earlier, noisier timestep."""
    from diffusers.models.attention_processor import SpatialNorm

    norms = [module for module in movq.decoder.modules() if isinstance(module, SpatialNorm)]
    if not norms:  # checked before any weight changes, so a refused MOVQ is left whole
        raise ValueError("scale_latents expects a MOVQ with spatial norms (norm_type='spatial')")
    if factor == 1.0:
        return
    movq.quant_conv.weight.mul_(factor)
    movq.quant_conv.bias.mul_(factor)
    movq.quantize.embedding.weight.mul_(factor)
    movq.post_quant_conv.weight.div_(factor)
    for norm in norms:
        norm.conv_y.weight.div_(factor)
        norm.conv_b.weight.div_(factor)


@torch.no_grad()
def encode_latents(movq, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``movq.encode(image)["latents"]`` for every image (what the U-Net learns to produce), on the MOVQ's device."""
    device = movq.device
    return torch.cat([movq.encode(to_model_range(images[i : i + batch_size].to(device))).latents for i in range(0, len(images), batch_size)])


def refine_movq_decoder(
    movq, images: torch.Tensor, steps: int, batch_size: int = 4, lr: float = 1e-3, seed: int = 0, log_path=None,
    progress: bool = True, device: str = "cpu", edge_weight: float = 0.0,
) -> dict[str, float]:
    """Train the decoder half only, the encoder frozen: the latents (what the U-Net learns)
    do not move, so this can run beside (or after) the U-Net's training."""
    decoder_params = [p for name, p in movq.named_parameters() if not name.startswith(("encoder.", "quant_conv."))]
    movq.requires_grad_(False)
    for p in decoder_params:
        p.requires_grad_(True)
    movq.to(device).train()
    optimizer, schedule = optimizer_and_schedule(decoder_params, lr, steps, warmup=20)
    generator = torch.Generator().manual_seed(seed)
    index_batches = batches(len(images), batch_size, generator)
    log = LossLog("movq-decoder", steps, log_path, progress=progress)
    for step in range(steps):
        x = to_model_range(images[next(index_batches)].to(device))
        with torch.no_grad():
            h = movq.encode(x).latents
        noisy = h + LATENT_NOISE * torch.randn(h.shape, generator=generator).to(h.device)
        recon = movq.decode(noisy, force_not_quantize=True).sample
        loss = reconstruction_loss(recon, x, edge_weight)
        optimiser_step(loss, optimizer, schedule, decoder_params)
        log.step(step, rec=loss.item())
    movq.eval().requires_grad_(False)
    return log.close()
