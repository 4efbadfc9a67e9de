"""Every stage model in one process, called through :func:`serve.graph.plan.plan` as the
ingress calls the deployments: for the quality benchmark and tests that check the graph without Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deployments.denoiser import DenoiserModel
from deployments.image_encoder import ImageEncoderModel
from deployments.messages import (
    CAPTION_TASK, ClipImageEmbeddings, EncodedImages, Florence2Request, ImageEmbeddings, ImageLatents, Latents, TextEmbeddings,
    UnderstandingAnswer,
)
from deployments.movq import MovqModel, feather
from deployments.performance import ModelOptions
from deployments.prior import PriorModel
from deployments.text_encoder import MultilingualTextEncoderModel, TextEncoderModel
from serve.graph.plan import plan


class LocalCalls:
    """:class:`serve.graph.plan.StageCalls` on the models, one request at a time (returns values, not handles).

    ``checkpoint``: a 2.2 one (prior, decoder, inpaint, controlnet) or a 2.1 one (prior,
    decoder, inpaint), whose decoder also carries its text encoder."""

    def __init__(self, checkpoint, fine_tuned: dict | None = None, florence2=None, dtype: str = "float32",
                 options: ModelOptions = ModelOptions(), device: str = "cpu") -> None:
        """``florence2``: a Florence-2 checkpoint directory, for ``caption_check``. ``device``,
        ``dtype`` and ``options`` (:mod:`deployments.performance`): where and how every
        generation model runs."""
        prior_path, decoder_path, inpaint_path, *controlnet_path = checkpoint
        run = {"device": device, "dtype": dtype, "options": options}
        self.fine_tuned = {model_id: PriorModel.from_pretrained(path, **run) for model_id, path in (fine_tuned or {}).items()}
        self.text = TextEncoderModel.from_pretrained(prior_path, **run)
        self.images = ImageEncoderModel.from_pretrained(prior_path, **run)
        self.prior_model = PriorModel.from_pretrained(prior_path, **run)
        self.decoders = {
            "text2img": DenoiserModel.from_pretrained(decoder_path, **run),
            "inpaint": DenoiserModel.from_pretrained(inpaint_path, **run),
            **({"controlnet": DenoiserModel.from_pretrained(controlnet_path[0], **run)} if controlnet_path else {}),
        }
        self.family = "2.1" if self.decoders["text2img"].text_conditioned else "2.2"
        self.decoder_text = MultilingualTextEncoderModel.from_pretrained(decoder_path, **run) if self.family == "2.1" else None
        self.movq = MovqModel.from_pretrained(decoder_path, **run)
        self.captioner = None
        if florence2 is not None:
            from deployments.florence2 import Florence2Model

            self.captioner = Florence2Model.from_pretrained(florence2)

    async def encode_text(self, texts, request_id):
        return TextEmbeddings(*self.text.encode(texts))

    async def encode_decoder_text(self, texts, request_id):
        return TextEmbeddings(*self.decoder_text.encode(texts))

    async def embed_images(self, images, request_id):
        return ClipImageEmbeddings(self.images.embed(images))

    async def prior(self, text, params, images=None):
        model = self.fine_tuned[params.model] if params.model else self.prior_model
        [(embeds, negative)] = model.generate([(text, params, images)])
        return ImageEmbeddings(embeds, negative, list(params.seeds))

    async def encode_image(self, image):
        [(latents, keep)] = self.movq.encode([image])
        return ImageLatents(latents, keep)

    async def denoise(self, decoder, embeddings, params, init=None, hint=None, text=None):
        [latents] = self.decoders[decoder].generate([(embeddings, params, init, hint, text)])
        return Latents(latents)

    async def upscale(self, latents, params):
        return ImageLatents(self.movq.upscale(latents.latents, params.width, params.height, params.mode))

    async def caption(self, image, request_id):
        if self.captioner is None:
            raise ValueError("caption_check needs a Florence-2 checkpoint (LocalCalls(florence2=...))")
        [answer] = self.captioner.run([Florence2Request(image, CAPTION_TASK)])
        return UnderstandingAnswer(answer)

    async def decode(self, latents, params):
        [images] = self.movq.decode_many([latents.latents])
        if params.composite is not None:
            images = [feather(image, params.composite) for image in images]
        return EncodedImages(list(images), "raw")

    def generate(self, spec):
        """(H, W, 3) uint8 images of ``spec`` (run as this checkpoint's family)."""
        from dataclasses import replace

        return asyncio.run(plan(replace(spec, family=self.family), self, "local")).images


class _Pending:
    """A stage call not yet run; awaiting it waits for its stage's batch."""

    def __init__(self, stage: str, args: tuple) -> None:
        self.stage, self.args = stage, args
        self.future = asyncio.get_running_loop().create_future()

    @property
    def value(self):
        return self.future.result()

    @value.setter
    def value(self, result) -> None:
        self.future.set_result(result)


class BatchedCalls(LocalCalls):
    """Like :class:`LocalCalls`, but runs many requests stage by stage, each stage's calls in
    one batch — as the deployments batch concurrent requests."""

    STAGES = ("text", "images", "encode", "prior", "denoise", "decode")

    def __init__(self, models: LocalCalls) -> None:
        self.__dict__.update(vars(models))  # share the loaded models
        self.pending: list[_Pending] = []

    async def _defer(self, stage, *args):
        call = _Pending(stage, args)
        self.pending.append(call)
        return await call.future

    async def encode_text(self, texts, request_id):
        return await self._defer("text", texts)

    async def embed_images(self, images, request_id):
        return await self._defer("images", images)

    async def prior(self, text, params, images=None):
        return await self._defer("prior", text, params, images)

    async def encode_image(self, image):
        return await self._defer("encode", image)

    async def denoise(self, decoder, embeddings, params, init=None, hint=None, text=None):
        return await self._defer("denoise", decoder, embeddings, params, init, hint, text)

    async def decode(self, latents, params):
        return await self._defer("decode", latents, params)

    def run(self, specs) -> list[list]:
        """Every spec's images. ``batch_sizes``: the largest batch each stage ran."""
        return asyncio.run(self._run(specs))

    async def _run(self, specs):
        tasks = [asyncio.ensure_future(plan(spec, self, f"r{i}")) for i, spec in enumerate(specs)]
        self.batch_sizes: dict[str, int] = {}
        while not all(task.done() for task in tasks):
            for _ in range(20):  # let every request run until it waits on a stage
                await asyncio.sleep(0)
            waiting = [call for call in self.pending if not call.future.done()]
            if not waiting:
                continue
            # The earliest stage anyone waits on runs next, with everyone waiting on it.
            stage = min((call.stage for call in waiting), key=self.STAGES.index)
            calls = [call for call in waiting if call.stage == stage]
            self.batch_sizes[stage] = max(self.batch_sizes.get(stage, 0), len(calls))
            getattr(self, f"_run_{stage}")(calls)
        self.pending = []
        return [task.result().images for task in tasks]

    def _run_text(self, calls):
        flat = [text for call in calls for text in call.args[0]]
        embeds, hidden, mask = self.text.encode(flat)
        offset = 0
        for call in calls:
            rows = slice(offset, offset + len(call.args[0]))
            offset = rows.stop
            call.value = TextEmbeddings(embeds[rows], hidden[rows], mask[rows])

    def _run_images(self, calls):
        embeds = self.images.embed([image for call in calls for image in call.args[0]])
        offset = 0
        for call in calls:
            call.value = ClipImageEmbeddings(embeds[offset : offset + len(call.args[0])])
            offset += len(call.args[0])

    def _run_prior(self, calls):
        for call, (embeds, negative) in zip(calls, self.prior_model.generate([call.args for call in calls])):
            call.value = ImageEmbeddings(embeds, negative, list(call.args[1].seeds))

    def _run_encode(self, calls):
        for call, (latents, keep) in zip(calls, self.movq.encode([call.args[0] for call in calls])):
            call.value = ImageLatents(latents, keep)

    def _run_denoise(self, calls):
        for decoder, model in self.decoders.items():
            mine = [call for call in calls if call.args[0] == decoder]
            if mine:
                for call, latents in zip(mine, model.generate([call.args[1:] for call in mine])):
                    call.value = Latents(latents)

    def _run_decode(self, calls):
        for call, images in zip(calls, self.movq.decode_many([call.args[0].latents for call in calls])):
            composite = call.args[1].composite
            call.value = EncodedImages([image if composite is None else feather(image, composite) for image in images], "raw")


def embedded_graph(checkpoint: Path | str | None = None) -> BatchedCalls:
    """The shipped trained model (or ``checkpoint``, a directory with ``prior/`` and ``decoder/``)
    with its derived decoder variants, batched stage by stage. The variants land where the
    service keeps them (once per decoder weights), not in a temporary directory per run."""
    from serve.embedded import trained_checkpoint, with_derived_variants
    from serve.settings import default_cache_dir

    prior, decoder = (Path(checkpoint) / "prior", Path(checkpoint) / "decoder") if checkpoint else trained_checkpoint()
    return BatchedCalls(LocalCalls(with_derived_variants(prior, decoder, default_cache_dir())))
