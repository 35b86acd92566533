"""How the command line is read (gptforge.cli.parser): free text is taken whole."""

import pytest

from gptforge.cli import build_parser, main
from gptforge.cli.parser import whole_text_values


def parse(*argv: str):
    parser = build_parser()
    return parser.parse_args(whole_text_values(parser, list(argv)))


def test_free_text_beginning_with_a_dash_is_the_value():
    # secrets.token_urlsafe(24), as docs/chat.md suggests, begins with "-" once in 64 keys
    assert parse("serve", "--ckpt", "r", "--api-key", "-Zq3xUu0xqT9s").api_key == "-Zq3xUu0xqT9s"
    args = parse("sample", "--ckpt", "r", "--prompt", "-- ROMEO:", "--stop", "-\n", "--top-k", "5")
    assert (args.prompt, args.stop, args.top_k) == ("-- ROMEO:", ["-\n"], 5)
    args = parse("chat", "--ckpt", "r", "-m", "-1 + 2?", "--system", "--be brief", "--seed", "3")
    assert (args.message, args.system, args.seed) == ("-1 + 2?", "--be brief", 3)
    assert parse("sample", "--ckpt", "r", "--prompt=-x").prompt == "-x"  # already attached


@pytest.mark.parametrize("argv, message", [
    (["sample", "--ckpt", "r", "--prompt"], "argument --prompt: expected one argument"),
    # an option of the command is never taken as the value: the value was forgotten
    (["sample", "--prompt", "--ckpt", "r"], "argument --prompt: expected one argument"),
    (["serve", "--ckpt", "r", "--api-key", "--port", "80"], "argument --api-key: expected one argument"),
    # a dash-led word after an option that is not free text is still an unknown option
    (["sample", "--ckpt", "r", "--top-k", "-x"], "argument --top-k: expected one argument"),
])
def test_a_missing_value_is_still_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_words_after_a_double_dash_are_left_as_they_are():
    parser = build_parser()
    argv = ["prepare", "--out", "d", "--", "--api-key", "-x"]
    assert whole_text_values(parser, argv) == argv
