"""The command line: every command's --help, one meaning per option name, the old spellings, and that the
decoding commands build their engine with ``recyclegpt.load``. Nothing here loads a real model."""

import argparse
import json

import pytest

from recyclegpt import cli
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.generate import Engine
from recyclegpt.options import OPTIONS


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option's first spelling (``--prepack`` stands for ``--prepack`` / ``--no-prepack``)."""
    return {a.option_strings[0]: a for a in p._actions if a.option_strings and a.option_strings[0] != "-h"}


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: recyclegpt {command}")
    assert " ".join(cli.COMMANDS[command][0].__doc__.split()[:3]) in " ".join(out.split())  # its description
    assert "--bf16" not in out and "--base" not in out  # old spellings stay hidden


def test_every_option_has_one_meaning_and_a_help():
    seen: dict[str, str] = {}
    for name, p in _subparsers().items():
        for flag, action in _options(p).items():
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {flag} has no help"
            assert seen.setdefault(flag, action.help) == action.help, f"{flag} means something else in {name}"
    assert {f"--{n}" for n in OPTIONS if f"--{n}" in seen} == seen.keys()  # every option comes from the table


def test_json_is_a_path_everywhere(tmp_path):
    parser, having = cli.build_parser(), []
    required = {"generate": ["--prompt", "x"], "bench": ["--prompts", "p.txt"]}
    for name, p in _subparsers().items():
        if "--json" in _options(p):
            having.append(name)
            args = parser.parse_args([name, *required.get(name, []), "--json", str(tmp_path / "r.json")])
            assert args.json == str(tmp_path / "r.json"), name
    assert set(having) == {"info", "generate", "eval", "bench", "lm-eval"}


def test_compare_module_repeats_and_model_names_the_base_everywhere():
    parser = cli.build_parser()
    for argv in (["eval"], ["bench", "--prompts", "p.txt"]):
        args = parser.parse_args([*argv, "--compare-module", "a.safetensors", "--compare-module", "b.safetensors"])
        assert args.compare_modules == ["a.safetensors", "b.safetensors"]
    for name, p in _subparsers().items():
        if name not in ("info", "bases", "demo", "train", "draft-vocab"):
            assert "--model" in _options(p), f"{name} takes no --model"
        assert "--dtype" not in _options(p) or _options(p)["--dtype"].choices == ["float32", "bfloat16"]


@pytest.mark.parametrize("argv, new, values", [
    (["attach", "--base", "gemma3-270m", "--data", "d", "--out", "o"], "--model", {"model": "gemma3-270m"}),
    (["average", "a", "b", "--base", "gemma3-270m", "--out", "o"], "--model", {"model": "gemma3-270m"}),
    (["train", "--data", "d", "--out", "o", "--bf16"], "--dtype bfloat16", {"dtype": "bfloat16"}),
    (["data", "distill", "--out", "o", "--bf16"], "--dtype bfloat16", {"dtype": "bfloat16"}),
    (["eval", "--data", "t.txt"], "--text", {"text": "t.txt"}),
    (["info", "--json"], "--print-json", {"print_json": True, "json": None}),
    (["generate", "--prompt", "x", "--json"], "--print-json", {"print_json": True, "json": None}),
])
def test_old_spellings_still_parse_with_a_note(argv, new, values, capsys):
    args = cli.build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in values} == values
    note = capsys.readouterr().err.strip()
    assert note.startswith("recyclegpt: ") and "is deprecated" in note and note.endswith(f"use {new}")
    assert len(note.splitlines()) == 1


def test_new_spellings_print_no_note(capsys):
    cli.build_parser().parse_args(["attach", "--model", "m", "--data", "d", "--out", "o", "--dtype", "bfloat16"])
    cli.build_parser().parse_args(["info", "--print-json", "--json", "x.json"])
    assert capsys.readouterr().err == ""


def test_generate_loads_through_recyclegpt_load_and_writes_json(tiny, monkeypatch, tmp_path, capsys):
    base = argparse.Namespace(name="tiny", chat=False, tokenizer=ByteTokenizer())
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return Engine(tiny.backbone, base.tokenizer), base

    monkeypatch.setattr(cli, "load", fake_load)
    out = tmp_path / "g.json"
    assert cli.main(["generate", "--prompt", "hello", "--max-new-tokens", "4", "--json", str(out)]) == 0
    (args, kwargs), = calls
    assert args[0] == "smollm2-135m" and kwargs == {"with_base": True}
    written = json.loads(out.read_text())
    assert len(written["token_ids"]) == 4 and written["strategy"] == "standard"
    printed = capsys.readouterr()
    assert printed.out.strip() == written["text"].strip() and "tok/s" in printed.err  # text, not JSON
    assert cli.main(["generate", "--prompt", "hello", "--max-new-tokens", "4", "--print-json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == written["token_ids"]


def test_speed_from_the_command_line_and_its_errors(tiny, monkeypatch, capsys):
    base = argparse.Namespace(name="tiny", chat=False, tokenizer=ByteTokenizer())
    monkeypatch.setattr(cli, "load", lambda *a, **k: (Engine(tiny.backbone, base.tokenizer), base))
    run = ["generate", "--prompt", "hello", "--max-new-tokens", "6", "--print-json"]
    assert cli.main(run) == 0
    standard = json.loads(capsys.readouterr().out)["token_ids"]
    assert cli.main([*run, "--strategy", "speed", "--early-exit-layer", "1", "--draft-width", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == standard
    assert cli.main([*run, "--strategy", "speed", "--early-exit-layer", "2"]) == 2
    assert capsys.readouterr().err == \
        "error: early exit layer must be in [1, 1] for this model of 2 logical layers, got 2\n"
    assert cli.main([*run, "--strategy", "verified", "--early-exit-layer", "1"]) == 2
    assert "an early exit layer is a setting of strategy 'speed', not 'verified'" in capsys.readouterr().err


def test_user_errors_are_one_line_and_status_2(capsys):
    assert cli.main(["generate", "--prompt", "  "]) == 2
    assert capsys.readouterr().err == "error: the prompt is empty; give some text with --prompt\n"
    assert cli.main(["data", "merge", "a", "--out", "o", "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to data distill and data prompts only" in capsys.readouterr().err


def test_info_shows_the_logical_depth_of_a_shared_preset(capsys):
    assert cli.main(["info", "--preset", "small-shared-2x"]) == 0
    assert "(12 logical layers over 6 unique blocks, d 384)" in capsys.readouterr().out
    assert cli.main(["info", "--preset", "small"]) == 0
    assert "(6 layers, d 384)" in capsys.readouterr().out
