"""The decoder U-Net: ``UNet2DConditionModel`` on MOVQ latents, conditioned on CLIP image embeddings.

As in Kandinsky 2.2: ``addition_embed_type="image"`` and ``encoder_hid_dim_type="image_proj"``,
both fed by ``added_cond_kwargs={"image_embeds": ...}``; the U-Net predicts noise
(epsilon) in its first half of output channels, the second half is the learned
variance, which ``DDPMScheduler(variance_type="fixed_small")`` ignores and this
recipe leaves untrained. Classifier-free guidance: a fraction of the rows is
conditioned on the embedding of the all-zero image, exactly the negative embedding
the prior pipeline hands the decoder when there is no negative prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.training.common import LossLog, batches, optimiser_step, optimizer_and_schedule

UNCOND_PROB = 0.15


def build_unet(
    clip_dim: int, latent_channels: int, seed: int, channels: tuple[int, int] = (32, 64), *, in_channels: int | None = None,
    addition_embed_type: str = "image", head_dim: int = 16, norm_groups: int = 16, sample_size: int | None = 8,
    encoder_hid_dim_type: str = "image_proj",
):
    """The decoder's U-Net; ``in_channels`` (default ``latent_channels``) and ``addition_embed_type``
    differ in the inpainting and ControlNet variants. Kandinsky 2.1's (``addition_embed_type="text_image"``,
    ``encoder_hid_dim_type="text_image_proj"``) also reads text: ``clip_dim`` is then its text encoder's width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels or latent_channels,
        out_channels=2 * latent_channels,  # mean and learned variance, as in the real decoder
        addition_embed_type=addition_embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=tuple(channels),
        layers_per_block=1,
        encoder_hid_dim=clip_dim,
        encoder_hid_dim_type=encoder_hid_dim_type,
        cross_attention_dim=32,
        attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=norm_groups,
    )


def decoder_loss(
    unet, scheduler, latents, image_embeds, zero_embed, generator, low_noise_t: int = 0, mismatch: float = 0.0,
) -> torch.Tensor:
    """ε-prediction loss. ``mismatch`` of the rows drawn with ``t < low_noise_t`` are conditioned
    on another row's embedding: at little noise the latents, not the condition, decide the
    image, so image-to-image at low strength keeps its input even when the prompt contradicts
    it (in these scenes the embedding alone fixes every pixel, and the decoder learns to
    repaint anything that disagrees with it)."""
    n, device = latents.shape[0], latents.device
    # Drawn on the CPU generator whatever the device: the same draws on every device.
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    drop = (torch.rand(n, generator=generator) < UNCOND_PROB).to(device)
    condition = image_embeds
    if mismatch > 0:
        swap = ((torch.rand(n, generator=generator) < mismatch).to(device)) & (t < low_noise_t)
        # Each row's partner drawn on its own (so a row can be its own partner, 1 in n).
        others = image_embeds[torch.rand(n, n, generator=generator).argmax(dim=1).to(device)]
        condition = torch.where(swap[:, None], others, condition)
    condition = torch.where(drop[:, None], zero_embed.expand_as(image_embeds), condition)
    prediction = unet(noisy, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": condition}).sample
    epsilon, _variance = prediction.split(latents.shape[1], dim=1)
    return F.mse_loss(epsilon, noise)


def train_decoder(
    unet, scheduler, latents: torch.Tensor, image_embeds: torch.Tensor, zero_embed: torch.Tensor,
    steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log_path=None, progress: bool = True,
    low_noise_t: int = 0, mismatch: float = 0.0, ema: float = 0.0,
) -> dict[str, float]:
    """Train on ``latents``/``image_embeds`` where they are (the U-Net is moved there).
    ``ema`` > 0: the U-Net ends with the exponential moving average of its weights."""
    unet.to(latents.device).train()
    optimizer, schedule = optimizer_and_schedule(unet.parameters(), lr, steps)
    generator = torch.Generator().manual_seed(seed)
    index_batches = batches(len(latents), batch_size, generator)
    log = LossLog("decoder", steps, log_path, progress=progress)
    params = list(unet.parameters())
    averaged = [p.detach().clone() for p in params] if ema > 0 else None
    for step in range(steps):
        indices = next(index_batches)
        indices = indices.to(latents.device)
        loss = decoder_loss(
            unet, scheduler, latents[indices], image_embeds[indices], zero_embed, generator, low_noise_t, mismatch,
        )
        optimiser_step(loss, optimizer, schedule, params)
        if averaged is not None:
            with torch.no_grad():  # the usual warm-up: early weights are forgotten fast
                torch._foreach_lerp_(averaged, [p.detach() for p in params], 1.0 - min(ema, (1 + step) / (10 + step)))
        log.step(step, loss=loss.item())
    if averaged is not None:
        with torch.no_grad():
            for p, a in zip(params, averaged):
                p.copy_(a)
    unet.eval()
    return log.close()
