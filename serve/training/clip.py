"""A tiny CLIP (text + vision towers, contrastive) in the classes Kandinsky 2.2's prior uses.

``CLIPTextModelWithProjection`` and ``CLIPVisionModelWithProjection`` are trained
together with a contrastive loss. Captions name only some attributes of a scene
("a red shape"), so a batch can hold several true matches for one caption: the
targets are spread over every image the caption describes (and every caption
that describes an image), rather than assuming the diagonal is the only match.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from serve.training.common import LossLog, batches, optimiser_step, optimizer_and_schedule
from serve.training.data import IMAGE_SIZE, SceneSet, caption_words, described_matrix
from serve.training.tokenizer import BUILT_IN_WORDS, build_tokenizer

# Pooled text/image embedding size = the prior's embedding_dim = the text tower's hidden size
# (PriorTransformer projects last_hidden_state with an embedding_dim input).
CLIP_DIM = 128
VISION_HIDDEN = 96
VISION_LAYERS = 3
PATCH_SIZE = 8
MAX_TOKENS = 32  # the captions are short; the tokenizer's model_max_length and the prior's num_embeddings
NUM_MERGES = 3000  # enough that every caption word becomes one token
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_trained_tokenizer():
    """CLIP BPE learned locally from the built-in word list plus the captions' words (en + ru)."""
    corpus = tuple(sorted(set(BUILT_IN_WORDS) | set(caption_words())))
    return build_tokenizer(corpus, num_merges=NUM_MERGES, max_length=MAX_TOKENS)


def build_clip(
    tokenizer, seed: int, clip_dim: int = CLIP_DIM, vision_hidden: int = VISION_HIDDEN,
    vision_layers: int = VISION_LAYERS, patch_size: int = PATCH_SIZE,
):
    """(text_encoder, image_encoder) with ``clip_dim`` embeddings; the text context is the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=clip_dim,
            projection_dim=clip_dim,
            intermediate_size=2 * clip_dim,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=vision_hidden,
            projection_dim=clip_dim,
            intermediate_size=2 * vision_hidden,
            num_attention_heads=4,
            num_hidden_layers=vision_layers,
            image_size=IMAGE_SIZE,
            patch_size=patch_size,
            num_channels=3,
        )
    )
    return text_encoder, image_encoder


def build_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        resample=3,
    )


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) uint8 -> what ``build_image_processor()`` makes of them (64×64 needs no resize)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """As the prior pipeline tokenizes: padded to the full context, truncated."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")


def train_clip(
    text_encoder,
    image_encoder,
    tokenizer,
    data: SceneSet,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_path=None,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    text_encoder.to(device).train()
    image_encoder.to(device).train()
    logit_scale = torch.nn.Parameter(torch.tensor(2.66, device=device))  # log(1/0.07), as in CLIP; not saved
    params = list(text_encoder.parameters()) + list(image_encoder.parameters()) + [logit_scale]
    optimizer, schedule = optimizer_and_schedule(params, lr, steps, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    index_batches = batches(len(data), batch_size, generator)
    log = LossLog("clip", steps, log_path, progress=progress)
    for step in range(steps):
        indices = next(index_batches).tolist()
        texts, attributes = data.captions_with_attributes(indices, rng)
        scenes = [data.scenes[i] for i in indices]
        # match[i, j]: caption j describes image i
        match = described_matrix(scenes, attributes).to(device)
        # Padded to the longest caption only: the text tower is causal, so the pooled
        # embedding (at the end token) is the same as with padding to the full context.
        tokens = tokenizer(texts, padding="longest", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        text = F.normalize(text_encoder(input_ids=tokens.input_ids.to(device)).text_embeds, dim=-1)
        image = F.normalize(image_encoder(pixel_values=pixel_values(data.images[indices]).to(device)).image_embeds, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image @ text.T
        loss_image = -(F.log_softmax(logits, dim=1) * match / match.sum(1, keepdim=True)).sum(1).mean()
        loss_text = -(F.log_softmax(logits.T, dim=1) * match.T / match.T.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_image + loss_text) / 2
        optimiser_step(loss, optimizer, schedule, params)
        log.step(step, loss=loss.item())
    text_encoder.eval()
    image_encoder.eval()
    return log.close()


@torch.no_grad()
def image_embeddings(image_encoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unnormalised ``image_embeds`` (what the prior predicts and the decoder is conditioned on), on the encoder's device."""
    device = image_encoder.device
    return torch.cat([image_encoder(pixel_values=pixel_values(images[i : i + batch_size]).to(device)).image_embeds for i in range(0, len(images), batch_size)])


@torch.no_grad()
def zero_image_embedding(image_encoder) -> torch.Tensor:
    """(1, D): the embedding of an all-zero *normalised* image, exactly as
    ``KandinskyV22PriorPipeline.get_zero_embed`` makes the default negative embedding."""
    size = image_encoder.config.image_size
    return image_encoder(torch.zeros(1, 3, size, size, device=image_encoder.device))["image_embeds"]
