"""``bench understanding``'s bookkeeping against fake services: batch sizes from /metrics,
caption comparison between sides, and the ``caption_check`` contract."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve.tools.bench_understanding import (
    CaptionCheckUnavailable, batch_counters, batch_delta, measure_caption_check, measure_captioning, scenes,
    understanding_tables,
)

BOUNDS = ("1.0", "2.0", "4.0", "8.0", "+Inf")


def exposition(batches: list[int], stage: str = "florence2") -> str:
    """A /metrics text as two replicas of ``stage`` would export it (plus another stage's series)."""
    lines = []
    for worker, share in (("a", batches[::2]), ("b", batches[1::2])):
        tags = f'stage="{stage}",WorkerId="{worker}"'
        lines.append(f"ray_kandinsky_serve_stage_batch_size_count{{{tags}}} {len(share)}")
        lines.append(f"ray_kandinsky_serve_stage_batch_items_total{{{tags}}} {sum(share)}")
        for bound in BOUNDS:
            below = sum(1 for size in share if size <= float(bound))
            lines.append(f'ray_kandinsky_serve_stage_batch_size_bucket{{{tags},le="{bound}"}} {below}')
    lines.append('ray_kandinsky_serve_stage_batch_items_total{stage="movq"} 99')
    return "\n".join(lines)


def test_batch_sizes_between_two_scrapes_count_only_the_stage_and_the_interval():
    before = batch_counters(exposition([1, 1, 3]))
    after = batch_counters(exposition([1, 1, 3, 2, 8, 8, 1]))
    delta = batch_delta(before, after)
    assert delta["batches"] == 4 and delta["calls"] == 19
    assert delta["mean_batch_size"] == pytest.approx(19 / 4)
    assert delta["batch_size_histogram"] == {"1": 1, "2": 1, "8": 2}


def test_scenes_are_distinct_pngs():
    images = scenes(12)
    assert len(set(images)) == 12


class FakeCaptioner:
    """/v1/caption and /metrics: every call its own batch of one; ``unstable`` images get a
    different caption on each call (as a batch-dependent model would)."""

    def __init__(self, unstable: frozenset[int] = frozenset()) -> None:
        self.batches: list[int] = []
        self.calls: dict[str, int] = {}
        self.order = {image: index for index, image in enumerate(scenes(4))}
        self.unstable = unstable

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=exposition(self.batches))
        image = json.loads(request.content)["image"]
        index = self.order[image]
        self.calls[image] = self.calls.get(image, 0) + 1
        self.batches.append(1)
        suffix = f" #{self.calls[image]}" if index in self.unstable else ""
        return httpx.Response(200, json={"text": f"picture {index}{suffix}", "request_id": "r"})


def _captioning(fake: FakeCaptioner) -> dict:
    async def run() -> dict:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake), base_url="http://fake") as client:
            return await measure_captioning(client, count=4, rounds=2)

    return asyncio.run(run())


def test_captioning_reports_both_sides_and_their_batches():
    result = _captioning(FakeCaptioner())
    assert result["captions_identical"] and result["mismatched_images"] == []
    assert result["captions"] == [f"picture {i}" for i in range(4)]
    for side in ("batched", "sequential"):
        assert result[side]["calls"] == 8 and result[side]["batches"] == 8, side  # 2 rounds x 4 images
        assert result[side]["mean_batch_size"] == 1.0 and result[side]["batch_size_histogram"] == {"1": 8}
        assert result[side]["images_per_s"] > 0
    assert result["throughput_ratio"] > 0


def test_captioning_names_the_images_whose_caption_depends_on_the_side():
    result = _captioning(FakeCaptioner(unstable=frozenset({2})))
    assert not result["captions_identical"] and result["mismatched_images"] == [2]
    assert "differ for images [2]" in "\n".join(understanding_tables({"captioning": result}))


REQUEST = {"prompt": "a red circle", "seed": 7, "width": 64, "height": 64, "steps": 2, "prior_steps": 2}


def fake_generator(answer_checks: bool = True, refuse: bool = False):
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        checked = body.pop("caption_check", False)
        if checked and refuse:
            return httpx.Response(422, json={"error": {"type": "invalid_request", "message": "caption_check: "
                                                       "Extra inputs are not permitted", "details": []}})
        timing = {"queue_ms": 1.0, "compute_ms": 10.0, "batch_size": 1}
        answer = {"images": [f"image-{body['seed']}"], "timings": {"denoiser": timing}}
        if checked and answer_checks:
            answer["checks"] = [{"caption": "a red circle", "clip_similarity": 0.5}]
            answer["timings"].update(caption_check={**timing, "compute_ms": 30.0},
                                     caption_check_embed={**timing, "compute_ms": 4.0})
        return httpx.Response(200, json=answer)

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://fake")


def test_caption_check_reports_p50s_the_difference_and_the_stage_timings():
    result = measure_caption_check(fake_generator(), REQUEST, rounds=3)
    assert len(result["samples_ms"]["plain"]) == len(result["samples_ms"]["checked"]) == 3
    assert result["added_ms"] == pytest.approx(result["checked_p50_ms"] - result["plain_p50_ms"])
    assert result["ratio"] == pytest.approx(result["checked_p50_ms"] / result["plain_p50_ms"])
    pairs = sorted(c - p for c, p in zip(result["samples_ms"]["checked"], result["samples_ms"]["plain"]))
    assert result["added_ms_paired_p50"] == pytest.approx(pairs[1])
    assert result["stage_p50_ms"] == {"caption_check": 31.0, "caption_check_embed": 5.0}
    assert result["images_identical"] and result["checks"][0]["caption"] == "a red circle"
    assert "each round's own difference" in "\n".join(understanding_tables({"caption_check": result}))


def test_caption_check_refused_or_answered_without_checks_is_a_clear_error():
    with pytest.raises(CaptionCheckUnavailable, match="refuses caption_check .*--parts captioning"):
        measure_caption_check(fake_generator(refuse=True), REQUEST, rounds=1)
    with pytest.raises(CaptionCheckUnavailable, match="one check per image"):
        measure_caption_check(fake_generator(answer_checks=False), REQUEST, rounds=1)


def test_an_unknown_part_exits_2_naming_it(capsys):
    from serve.cli import main

    assert main(["bench", "understanding", "--parts", "captioning,nope", "--url", "http://127.0.0.1:9"]) == 2
    assert "--parts: unknown ['nope']" in capsys.readouterr().err
