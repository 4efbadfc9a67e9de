from deployments.progress import Progress, ProgressBoard


def test_progress_counts_image_steps_and_never_exceeds_total():
    board = ProgressBoard()
    board.start("r", total=3)
    for _ in range(5):
        board.on_progress("r", 1, 3)
    assert board.get("r") == Progress(3, 3) and board.get("r").fraction == 1.0
    board.on_progress("unknown", 1, 1)  # steps of requests nobody tracks are ignored
    assert board.get("unknown") is None
