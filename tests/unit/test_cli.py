import yaml

from serve.cli import main


def test_make_tiny_writes_both_checkpoints(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "out"), "--seed", "3"]) == 0
    assert (tmp_path / "out" / "prior" / "model_index.json").is_file()
    assert (tmp_path / "out" / "decoder" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "decoder:" in capsys.readouterr().out


def test_make_tiny_writes_the_21_family_in_its_published_layout(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "out"), "--family", "2.1"]) == 0
    for name in ("kandinsky-2-1-prior", "kandinsky-2-1", "kandinsky-2-1-inpaint"):
        assert (tmp_path / "out" / name / "model_index.json").is_file()
    assert (tmp_path / "out" / "kandinsky-2-1" / "text_encoder" / "model.safetensors").is_file()
    assert "inpaint_decoder:" in capsys.readouterr().out


def test_make_tiny_writes_a_florence2_checkpoint(tmp_path, capsys):
    from deployments.florence2 import check_florence2_layout

    assert main(["make-tiny", str(tmp_path / "out"), "--family", "florence2"]) == 0
    assert check_florence2_layout(tmp_path / "out") == tmp_path / "out"
    assert "florence2:" in capsys.readouterr().out


def test_run_refuses_a_bad_config_with_a_clear_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "k", "import_path": "serve.graph.build:build_app",
                                                      "args": {"models": {"dtype": "float64"}}}]}))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "args.models.dtype" in err and str(path) in err


def test_run_refuses_a_missing_checkpoint_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    args = {"models": {"prior_path": str(tmp_path / "no-prior"), "decoder_path": str(tmp_path / "no-decoder")}}
    path.write_text(yaml.safe_dump({"applications": [{"name": "k", "import_path": "serve.graph.build:build_app", "args": args}]}))
    assert main(["run", "--config", str(path)]) == 2
    assert f"prior checkpoint directory {tmp_path / 'no-prior'} does not exist" in capsys.readouterr().err


def test_every_bench_subcommand_matches_its_function():
    """The generic bench adapter passes options by name: they must line up."""
    import inspect

    from serve.tools import bench
    from serve.cli import build_parser

    parser = build_parser()
    from serve.tools.bench_understanding import bench_understanding

    functions = {kind: getattr(bench, f"bench_{kind}") for kind in ("latency", "batching", "compare")}
    functions["understanding"] = bench_understanding  # bench.bench_understanding passes **options on
    for kind, function in functions.items():
        options = vars(parser.parse_args(["bench", kind]))
        given = set(options) - {"command", "kind", "func"}
        assert given == set(inspect.signature(function).parameters), kind


def test_run_refuses_a_negative_drain_timeout(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--drain-timeout-s", "-1"])
    assert exit_info.value.code == 2 and "--drain-timeout-s" in capsys.readouterr().err
