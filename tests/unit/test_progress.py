import asyncio

from deployments.progress import Progress, ProgressBoard


def test_progress_counts_image_steps_and_never_exceeds_total():
    board = ProgressBoard()
    board.start("r", total=3)
    for _ in range(5):
        board.on_progress("r", 1, 3)
    assert board.get("r") == Progress(3, 3) and board.get("r").fraction == 1.0
    board.on_progress("unknown", 1, 1)  # steps of requests nobody tracks are ignored
    assert board.get("unknown") is None


def test_subscribers_see_every_change_in_order_then_the_end():
    async def scenario():
        board = ProgressBoard()
        board.start("r", total=2)
        queue = board.subscribe("r")
        board.on_progress("r", 1, 2)
        board.on_progress("r", 2, 2)
        board.finish("r")
        seen = []
        while (update := await queue.get()) is not None:
            seen.append(update.done)
        return seen, board.get("r")

    seen, after = asyncio.run(scenario())
    assert seen == [0, 1, 2] and after is None
